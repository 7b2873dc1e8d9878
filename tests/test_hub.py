"""Models and adapters by Hub repo id, resolved from a local fake Hub cache (``HF_HUB_CACHE``, offline).

The cache is laid out exactly as ``huggingface_hub`` writes it (``models--owner--name/refs/<rev>`` holding a
commit hash, files under ``snapshots/<hash>/``), so the real ``snapshot_download(local_files_only=True)``
path runs; nothing is downloaded.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from trust_fixtures import bert_inputs, make_lora, outputs, peft_weight_deltas

from orthomerge.adapters import load_adapter
from orthomerge.errors import OrthomergeError
from orthomerge.hub import HubSpec, parse_hub_spec
from orthomerge.merge import merge_adapters
from orthomerge.models import load_model, resolve_model_path

MAIN, V1 = "a" * 40, "b" * 40


def put_snapshot(cache: Path, repo: str, commit: str, src: Path, refs=("main",), under: str = "") -> Path:
    """Copy ``src`` into the cache as repo ``repo`` at ``commit`` (optionally below ``under``)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit / under
    shutil.copytree(src, snap, dirs_exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture()
def hub(tmp_path, tiny_bert, monkeypatch):
    """A fake cache with owner/tiny-bert (the base) and owner/loras (two adapters in sub-folders, and a
    revision v1 whose task_a is another adapter)."""
    cache = tmp_path / "hub"
    put_snapshot(cache, "owner/tiny-bert", MAIN, Path(tiny_bert))
    made = {name: make_lora(tiny_bert, tmp_path / "made" / name, seed=seed)
            for name, seed in (("task_a", 1), ("task_b", 2), ("task_a_v1", 3))}
    for name in ("task_a", "task_b"):
        put_snapshot(cache, "owner/loras", MAIN, made[name], under=name)
    put_snapshot(cache, "owner/loras", V1, made["task_a_v1"], refs=("v1",), under="task_a")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return made


@pytest.mark.parametrize("spec, want", [
    ("owner/name", HubSpec("owner/name")),
    ("owner/name@v1.2", HubSpec("owner/name", "", "v1.2")),
    ("owner/name/sub/dir@main", HubSpec("owner/name", "sub/dir", "main")),
    ("./runs/a", None), ("/abs/path", None), ("minilm", None), ("~/x/y", None),
])
def test_parse_hub_spec(spec, want):
    assert parse_hub_spec(spec) == want


def test_model_from_the_cache_equals_the_local_folder(hub, tiny_bert):
    assert resolve_model_path("owner/tiny-bert").resolve().name == MAIN
    inputs = bert_inputs()
    torch.testing.assert_close(outputs(load_model("owner/tiny-bert"), inputs), outputs(load_model(tiny_bert), inputs))


def test_adapters_by_repo_subfolder_and_revision(hub, tiny_bert):
    for spec, made in (("owner/loras/task_a", "task_a"), ("owner/loras/task_a@v1", "task_a_v1")):
        adapter = load_adapter(spec)
        want = peft_weight_deltas(tiny_bert, hub[made])
        for m in adapter.modules:
            torch.testing.assert_close(adapter.delta(m).double(), want[f"{m}.weight"], rtol=1e-5, atol=1e-6)


def test_merge_of_hub_adapters_equals_the_merge_of_local_ones(hub, tiny_bert):
    remote = merge_adapters(["owner/loras/task_a", "owner/loras/task_b"], model="owner/tiny-bert")
    local = merge_adapters([hub["task_a"], hub["task_b"]], model=tiny_bert)
    for m in remote.merged.modules:
        torch.testing.assert_close(remote.delta(m), local.delta(m))


@pytest.mark.parametrize("spec", ["owner/missing", "owner/loras/task_a@v9", "owner/loras/nope"])
def test_missing_offline_is_one_line(hub, spec):
    with pytest.raises(OrthomergeError) as err:
        load_adapter(spec)
    assert str(err.value).startswith(spec) and "\n" not in str(err.value)


def test_missing_model_offline_is_one_line(hub):
    with pytest.raises(OrthomergeError, match="offline") as err:
        load_model("owner/missing-model")
    assert "\n" not in str(err.value)
