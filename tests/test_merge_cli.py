"""``orthomerge merge`` CLI and YAML recipes; bad inputs give one clear line and leave no output folder."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from merge_fixtures import (adapter_dirs, make_adapter, merge_model_dir, patched_logits, peft_logits,  # noqa: F401
                            rel)
from safetensors.torch import load_file, save_file

from orthomerge import cli
from orthomerge.adapters import load_adapter
REPORT_NAME = "merge_report.json"


@pytest.fixture(autouse=True)
def merge_only(monkeypatch):
    """Only the merge subcommand: the other subcommands are tested elsewhere."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["merge"])


def orthomerge(*argv) -> int:
    return cli.main(["merge", *map(str, argv)])


def test_list_methods(capsys):
    assert orthomerge("--list-methods") == 0
    out = capsys.readouterr().out
    for name in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "tsv", "iso_c",
                 "iso_cts", "regmean", "emr", "core_ties", "knots_ties", "core_tsv", "knots_dare_ties"):
        assert f"\n{name} " in "\n" + out


def best_rank(d: np.ndarray, k: int) -> np.ndarray:
    """The best rank-k approximation (Eckart–Young), by numpy's SVD."""
    u, s, vh = np.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_cli_merge_writes_peft_folders(tmp_path, adapter_dirs, merge_model_dir):
    out = tmp_path / "out"
    assert orthomerge("--method", "task_arithmetic", "--adapters", *adapter_dirs, "--weights", 0.5, 1, 1,
                      "--scale", 0.8, "--rank", 4, "--out", out, "--quiet") == 0
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["params"]["scale"] == 0.8 and report["output"]["rank"] == 4
    assert all(v["rank_out"] <= 4 for v in report["modules"].values())
    # oracle: 0.8 Σ w_i s_i B_i A_i from the input adapters' own factors (float64), cut to rank 4 by SVD
    inputs = [load_adapter(d) for d in adapter_dirs]
    full = {m: 0.8 * sum(w * (a.B[m].double() * a.scaling[m]) @ a.A[m].double() for w, a in zip((0.5, 1, 1), inputs))
            for m in inputs[0].modules}
    cut = {m: best_rank(d.numpy(), 4) for m, d in full.items()}
    for m, d in full.items():
        lost = np.linalg.norm(d.numpy() - cut[m]) / np.linalg.norm(d.numpy())
        assert report["modules"][m]["rel_error"] == pytest.approx(lost, rel=1e-3, abs=1e-6), m
        assert lost > 1e-3, m                # rank 4 really truncates here (Σr ≥ 7), so the check has teeth
    # PEFT's own forward pass of the written folders (base from the adapters' base_model_name_or_path)
    got = peft_logits(merge_model_dir, out)
    assert rel(got.numpy(), patched_logits(merge_model_dir, cut).numpy()) < 1e-4
    assert rel(got.numpy(), patched_logits(merge_model_dir, {}).numpy()) > 1e-3   # the update matters
    for d, a in zip(adapter_dirs, inputs):   # each task: the merged update with its own head
        task = peft_logits(merge_model_dir, out / "tasks" / d.name)
        assert rel(task.numpy(), patched_logits(merge_model_dir, cut, head=a.heads).numpy()) < 1e-4, d.name


def test_cli_space_and_set(tmp_path, adapter_dirs):
    out = tmp_path / "core"
    assert orthomerge("--method", "ties", "--space", "core", "--adapters", *adapter_dirs, "--density", 0.5,
                      "--set", "sign=frequency", "--set", "normalize=weight", "--out", out, "--quiet") == 0
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["method"] == "core_ties"
    assert report["params"]["sign"] == "frequency" and report["params"]["density"] == 0.5


def test_yaml_recipe(tmp_path, adapter_dirs, merge_model_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
merge_method: dare_ties
base_model: {merge_model_dir}
adapters:
  - path: {adapter_dirs[0]}
    parameters: {{weight: 1.0, density: 0.9}}
  - path: {adapter_dirs[1]}
    parameters: {{weight: 0.5}}
  - {adapter_dirs[2]}
parameters: {{density: 0.7, normalize: weight}}
seed: 3
output: {{format: peft, rank: 6, path: merged}}
""")
    assert orthomerge("--config", recipe, "--quiet") == 0
    report = json.loads((tmp_path / "merged" / REPORT_NAME).read_text())
    assert report["weights"] == [1.0, 0.5, 1.0] and report["seed"] == 3
    assert report["params"]["density"] == [0.9, 0.7, 0.7]
    assert report["recipe"] == str(recipe)
    # same recipe, same seed → the same adapter; the API gives the same result as the CLI
    from orthomerge.merge import run_recipe
    again = run_recipe(recipe, out=tmp_path / "again")
    m = again.merged.modules[0]
    first = load_adapter(tmp_path / "merged")
    assert rel(again.merged.delta(m), first.delta(m)) < 1e-6


def test_yaml_dense_output(tmp_path, adapter_dirs, merge_model_dir):
    recipe = tmp_path / "dense.yaml"
    recipe.write_text(f"method: tsv\nmodel: {merge_model_dir}\nadapters: [{adapter_dirs[0]}, {adapter_dirs[1]}]\n"
                      f"output: {{format: dense}}\n")
    assert orthomerge("--config", recipe, "--out", tmp_path / "d", "--quiet") == 0
    from transformers import BertForSequenceClassification

    from orthomerge.merge import merge_adapters

    base = BertForSequenceClassification.from_pretrained(merge_model_dir).state_dict()
    api = merge_adapters(adapter_dirs[:2], "tsv", dense=True, model=merge_model_dir)
    heads = load_adapter(adapter_dirs[1]).heads
    for folder, head in ((tmp_path / "d", {}), (tmp_path / "d" / "tasks" / adapter_dirs[1].name, heads)):
        state = BertForSequenceClassification.from_pretrained(folder).state_dict()
        assert state.keys() == base.keys() and set(head) <= set(state)
        for k, w in state.items():     # W₀ + the merged ΔW in the adapted modules, the task's head, else W₀
            m = k.removesuffix(".weight")
            want = head[k] if k in head else base[k] + api.delta(m) if m in api.dense[""] else base[k]
            assert rel(w.numpy(), want.numpy()) < 1e-5, (folder.name, k)


# ---------------------------------------------------------------- bad inputs


def copy_adapter(src, dst, config=None, tensors=None):
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors:
        t = load_file(str(dst / "adapter_model.safetensors"))
        tensors(t)
        save_file(t, str(dst / "adapter_model.safetensors"))
    return dst


def _nan(t):
    key = next(k for k in t if "lora_B" in k)
    t[key][0, 0] = float("nan")


@pytest.fixture(scope="module")
def bad(tmp_path_factory, adapter_dirs, merge_model_dir):
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    small = root / "small_base"
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=32,
                                             max_position_embeddings=128, num_labels=3)).save_pretrained(small)
    shape = make_adapter(str(small), root / "shape", r=2, alpha=2)
    copy_adapter(shape, root / "shape_same_base", config={"base_model_name_or_path": merge_model_dir})
    return {
        "base": copy_adapter(adapter_dirs[1], root / "other_base", config={"base_model_name_or_path": str(small)}),
        "targets": make_adapter(merge_model_dir, root / "targets", targets=("query",)),
        "shape": root / "shape_same_base",
        "nan": copy_adapter(adapter_dirs[1], root / "nan", tensors=_nan),
    }


CASES = {
    "different base": (lambda a, b: ["--method", "task_arithmetic", "--adapters", a[0], b["base"]], "base model"),
    "different targets": (lambda a, b: ["--method", "ties", "--adapters", a[0], b["targets"]], "target module"),
    "different shapes": (lambda a, b: ["--method", "tsv", "--adapters", a[0], b["shape"]], "×"),
    "nan": (lambda a, b: ["--method", "task_arithmetic", "--adapters", a[0], b["nan"]], "NaN"),
    "missing stats": (lambda a, b: ["--method", "regmean", "--adapters", a[0], a[1]], "statistics"),
    "stats count": (lambda a, b: ["--method", "regmean", "--adapters", a[0], a[1], "--stats", a[0]], "2 adapters"),
    "weights count": (lambda a, b: ["--method", "ties", "--adapters", a[0], a[1], "--weights", 1], "weights"),
    "unknown method": (lambda a, b: ["--method", "tie", "--adapters", a[0], a[1]], "unknown merge method"),
    "no factored ties": (lambda a, b: ["--method", "ties", "--space", "factored", "--adapters", a[0]], "variant"),
    "bad density": (lambda a, b: ["--method", "ties", "--adapters", a[0], "--density", 1.5], "density"),
    "bad param": (lambda a, b: ["--method", "ties", "--adapters", a[0], "--set", "sign=most"], "sign"),
    "unknown param": (lambda a, b: ["--method", "tsv", "--adapters", a[0], "--density", 0.2], "unknown parameter"),
    "missing adapter": (lambda a, b: ["--method", "tsv", "--adapters", a[0], a[0].parent / "nope"], "nope"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys, adapter_dirs, bad):
    argv, needle = CASES[case]
    out = tmp_path / "out"
    assert orthomerge(*argv(adapter_dirs, bad), "--out", out, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("orthomerge: error:") and "\n" not in err and needle in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text,needle", [
    ("method: ties\nadapters: []\n", "non-empty"),
    ("method: ties\nadapters: [A]\nfoo: 1\n", "unknown key 'foo'"),
    ("method: ties\nadapters:\n  - path: A\n    parameters: {sign: total}\n", "per-adapter parameter"),
    ("method: ties\nadapters: [A]\noutput: {format: gguf}\n", "output.format"),
    ("adapters: [A]\n", "no 'method'"),
    ("method: [unclosed\n", "not valid YAML"),
])
def test_bad_recipe(tmp_path, capsys, adapter_dirs, text, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.replace("A", str(adapter_dirs[0])))
    assert orthomerge("--config", recipe, "--out", tmp_path / "out", "--quiet") == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not (tmp_path / "out").exists()
