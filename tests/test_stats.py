"""Activation statistics against a direct hook computation; additivity; distributed equality; errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TEXTS
from orthomerge.errors import OrthomergeError
from orthomerge.models import load_model, load_tokenizer
from orthomerge.stats import collect_stats, combine_stats, load_stats, save_stats


def direct_inputs(model_path, texts, module_names, max_length=16):
    """Oracle: capture every target input with plain hooks, one sample at a time (no padding at all).

    Unpadded float32 forwards differ from padded batches by float rounding (~1e-7 relative), so
    comparisons against this oracle use rtol 1e-5."""
    model, tok = load_model(model_path), load_tokenizer(model_path)
    modules = dict(model.named_modules())
    captured = {m: [] for m in module_names}
    hooks = [modules[m].register_forward_hook(lambda mod, args, out, m=m: captured[m].append(args[0][0]))
             for m in module_names]
    with torch.no_grad():
        for text in texts:
            model(**tok([text], truncation=True, max_length=max_length, return_tensors="pt"))
    for h in hooks:
        h.remove()
    return {m: [x.double().numpy() for x in xs] for m, xs in captured.items()}


@pytest.mark.parametrize("fixture,targets", [("tiny_bert", ["query", "value"]),
                                             ("tiny_llama", ["q_proj", "v_proj", "o_proj"])])
def test_stats_equal_direct_computation(request, fixture, targets):
    path = request.getfixturevalue(fixture)
    model, tok = load_model(path), load_tokenizer(path)
    stats = collect_stats(model, tok, TEXTS, targets, max_length=16, batch_size=5, progress=False)
    inputs = direct_inputs(path, TEXTS, stats.modules)
    for module in stats.modules:
        xs = inputs[module]
        X = np.concatenate(xs)
        np.testing.assert_allclose(stats.gram(module).numpy(), X.T @ X, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(stats.sample_mean(module).numpy(), np.mean([x.mean(0) for x in xs], 0),
                                   rtol=1e-5, atol=1e-5)
        assert stats.tokens(module) == len(X)
    assert stats.sample_count == len(TEXTS)


def test_shared_inputs_are_grouped(tiny_bert, tiny_llama):
    bert = collect_stats(load_model(tiny_bert), load_tokenizer(tiny_bert), TEXTS[:4], ["query", "key", "value"],
                         progress=False)
    assert len(bert.groups) == 2 and all(len(v) == 3 for v in bert.groups.values())
    llama = collect_stats(load_model(tiny_llama), load_tokenizer(tiny_llama), TEXTS[:4],
                          ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj"], progress=False)
    sizes = sorted(len(v) for v in llama.groups.values())
    assert sizes == [1, 1, 2, 2, 2, 2]  # o_proj alone; q/v share; gate/up share


def test_float32_products_match_float64(tiny_bert):
    model, tok = load_model(tiny_bert), load_tokenizer(tiny_bert)
    fast = collect_stats(model, tok, TEXTS, ["query"], progress=False)
    exact = collect_stats(model, tok, TEXTS, ["query"], progress=False, float64=True)
    for m in fast.modules:
        torch.testing.assert_close(fast.gram(m), exact.gram(m), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(fast.sample_mean(m), exact.sample_mean(m), rtol=1e-6, atol=1e-6)


def test_per_sample_inputs_are_refused(tiny_bert):
    model, tok = load_model(tiny_bert), load_tokenizer(tiny_bert)
    with pytest.raises(OrthomergeError, match="pooler.dense.*per token"):
        collect_stats(model, tok, TEXTS, ["dense"], progress=False)


def test_padding_does_not_change_stats(tiny_bert):
    model, tok = load_model(tiny_bert), load_tokenizer(tiny_bert)
    one = collect_stats(model, tok, TEXTS, ["query"], batch_size=1, progress=False)
    many = collect_stats(model, tok, TEXTS, ["query"], batch_size=7, progress=False)
    for m in one.modules:
        torch.testing.assert_close(one.gram(m), many.gram(m), rtol=1e-5, atol=1e-4)
    assert one.token_count == many.token_count


def test_shards_combine_exactly(tiny_bert, tmp_path):
    model, tok = load_model(tiny_bert), load_tokenizer(tiny_bert)
    whole = collect_stats(model, tok, TEXTS, ["query", "value"], progress=False, float64=True)
    a = collect_stats(model, tok, TEXTS[:5], ["query", "value"], progress=False, float64=True)
    b = collect_stats(model, tok, TEXTS[5:], ["query", "value"], progress=False, float64=True)
    save_stats(a, tmp_path / "a.safetensors")
    save_stats(b, tmp_path / "b.safetensors")
    combined = combine_stats([load_stats(tmp_path / "a.safetensors"), load_stats(tmp_path / "b.safetensors")])
    assert combined.token_count == whole.token_count and combined.sample_count == whole.sample_count
    for m in whole.modules:
        torch.testing.assert_close(combined.gram(m), whole.gram(m), rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(combined.sample_mean(m), whole.sample_mean(m), rtol=1e-12, atol=1e-12)


def test_two_gloo_processes_equal_one(tiny_bert, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "{t}"}}\n' for t in TEXTS))
    common = ["stats", "--model", tiny_bert, "--data", str(data), "--targets", "query,value", "--quiet",
              "--batch-size", "3", "--float64"]
    single = subprocess.run([sys.executable, "-m", "orthomerge.cli", *common, "--out", str(tmp_path / "one.st")],
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", "29533", "-m", "orthomerge.cli", *common,
                            "--out", str(tmp_path / "two.st")], capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr
    one, two = load_stats(tmp_path / "one.st"), load_stats(tmp_path / "two.st")
    assert one.token_count == two.token_count and one.sample_count == two.sample_count
    for m in one.modules:
        torch.testing.assert_close(one.gram(m), two.gram(m), rtol=1e-12, atol=1e-10)


def test_files_hold_grams_and_mean_sums_and_old_sum_tensors_are_ignored(tiny_bert, tmp_path):
    """Σx was written by earlier versions and never read: new files lack it, old files with it still load."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    stats = collect_stats(load_model(tiny_bert), load_tokenizer(tiny_bert), TEXTS[:4], ["query"], progress=False)
    path = save_stats(stats, tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        names, metadata = set(handle.keys()), handle.metadata()
    assert names == {f"{k}::{part}" for k in stats.groups for part in ("gram", "mean_sum")}
    old = {**stats.tensors(), **{f"{k}::sum": torch.zeros(stats.grams[k].shape[0], dtype=torch.float64)
                                 for k in stats.groups}}
    save_file(old, str(tmp_path / "old.safetensors"), metadata=metadata)
    loaded = load_stats(tmp_path / "old.safetensors")
    for m in stats.modules:
        assert torch.equal(loaded.gram(m), stats.gram(m)) and torch.equal(loaded.sample_mean(m), stats.sample_mean(m))


def test_cached_stats_are_reused_only_for_the_same_rows(tiny_bert, tmp_path):
    """One cache (experiment and CLI): a file is reused when model, targets, max_length and rows match."""
    from orthomerge.cache import cached_stats
    from orthomerge.tasks import Split

    loads = []

    def base():
        loads.append(1)
        return load_model(tiny_bert), load_tokenizer(tiny_bert)

    rows, other_rows = Split(TEXTS[:4], [0] * 4), Split(TEXTS[4:8], [0] * 4)
    first = cached_stats(tmp_path, tiny_bert, rows, ["query"], 16, base=base)
    again = cached_stats(tmp_path, tiny_bert, rows, ["query"], 16, base=base)
    assert len(loads) == 1 and again.path == first.path and torch.equal(again.gram(again.modules[0]),
                                                                        first.gram(first.modules[0]))
    cached_stats(tmp_path, tiny_bert, rows, ["query"], 32, base=base)             # another max_length
    cached_stats(tmp_path, tiny_bert, other_rows, ["query"], 16, base=base)       # other rows
    assert len(loads) == 3 and len(list(tmp_path.glob("*.safetensors"))) == 3
    named = cached_stats(tmp_path, tiny_bert, rows, ["query"], 16, name="task.train", base=base)
    assert named.path == tmp_path / "task.train.safetensors" and len(loads) == 4
    changed = cached_stats(tmp_path, tiny_bert, other_rows, ["query"], 16, name="task.train", base=base)
    assert len(loads) == 5 and not torch.equal(changed.gram(changed.modules[0]), named.gram(named.modules[0]))
    # the base's precision is part of the key: a bfloat16 run does not reuse float32 statistics
    bf16 = cached_stats(tmp_path, tiny_bert, rows, ["query"], 16, base=None, dtype="bfloat16")
    assert bf16.meta["data"] != first.meta["data"] and bf16.path != first.path
    assert not torch.equal(bf16.gram(bf16.modules[0]), first.gram(first.modules[0]))


def test_bad_statistics_files(tiny_bert, tmp_path):
    model, tok = load_model(tiny_bert), load_tokenizer(tiny_bert)
    stats = collect_stats(model, tok, TEXTS[:3], ["query"], progress=False)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file at all")
    with pytest.raises(OrthomergeError, match="corrupt.safetensors"):
        load_stats(corrupt)
    with pytest.raises(OrthomergeError, match="pickle"):
        load_stats(tmp_path / "stats.bin")
    key = next(iter(stats.groups))
    stats.grams[key][0, 0] = float("nan")
    save_stats(stats, tmp_path / "nan.safetensors")
    with pytest.raises(OrthomergeError, match="NaN"):
        load_stats(tmp_path / "nan.safetensors")


def test_stats_cli_bad_data_files(tiny_bert, tmp_path, capsys):
    from orthomerge.cli import main as cli

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("sentence\nhello there\n")
    out = tmp_path / "s.safetensors"
    for data, message in [(tmp_path / "missing.csv", "missing.csv"), (empty, "empty.csv"), (nocol, "text")]:
        assert cli(["stats", "--model", tiny_bert, "--data", str(data), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert not out.exists() and not list(tmp_path.glob(".s.safetensors*"))


def test_stats_cli_pair_column_and_max_samples(tiny_bert, tmp_path):
    from orthomerge.cli import main as cli

    data = tmp_path / "pairs.tsv"
    data.write_text("premise\thypothesis\n" + "".join(f"{a}\t{b}\n" for a, b in zip(TEXTS, TEXTS[1:])))
    out = tmp_path / "p.safetensors"
    assert cli(["stats", "--model", tiny_bert, "--data", str(data), "--text-column", "premise",
                "--text-pair-column", "hypothesis", "--max-samples", "5", "--out", str(out), "--quiet"]) == 0
    stats = load_stats(out)
    assert stats.sample_count == 5 and stats.meta["max_length"] == 128 and stats.meta["targets"] == ["query", "value"]


def test_memory_plan_counts_every_target_and_refuses_before_any_work(tiny_bert, monkeypatch):
    from orthomerge.stats import memory_plan

    model, tok = load_model(tiny_bert), load_tokenizer(tiny_bert)
    plan = memory_plan(model, ["query", "value"])
    assert [(n, w) for n, w, _ in plan.modules] == [(f"bert.encoder.layer.{i}.attention.self.{m}", 32)
                                                    for i in range(2) for m in ("query", "value")]
    assert plan.total == 4 * (32 * 32 + 32) * 8 and "4 × 32²" in plan.describe()
    assert memory_plan(model, ["query", "value"], "float32").total == plan.total // 2
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(OrthomergeError, match="only 0.00 GiB are available"):
        collect_stats(model, tok, ["good movie"], ["query", "value"], max_bytes=plan.total - 1, progress=False)
    assert not calls   # refused before the first forward pass


def test_float32_storage_agrees_with_float64_and_loads_as_float64(tiny_bert, tmp_path):
    model, tok = load_model(tiny_bert), load_tokenizer(tiny_bert)
    texts = [f"{a} {b}" for a in TEXTS for b in TEXTS[:4]]
    full = collect_stats(model, tok, texts, ["query"], batch_size=4, progress=False)
    half = collect_stats(model, tok, texts, ["query"], batch_size=4, progress=False, storage="float32")
    m = full.modules[0]
    assert half.grams[half.key_of(m)].dtype == torch.float32 and half.gram(m).dtype == torch.float64
    assert float((half.gram(m) - full.gram(m)).norm() / full.gram(m).norm()) < 1e-6
    again = load_stats(save_stats(half, tmp_path / "h.safetensors"))
    assert again.meta["storage"] == "float32" and torch.equal(again.gram(m), half.gram(m))


BERT_LAYOUT = {"bert.embeddings": "cpu", "bert.encoder.layer.0": "cpu", "bert.encoder.layer.1": "disk",
               "bert.pooler": "cpu", "dropout": "cpu", "classifier": "cpu"}
LLAMA_LAYOUT = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                "model.norm": "cpu", "model.rotary_emb": "cpu", "score": "cpu"}


@pytest.mark.parametrize("fixture,targets,layout", [("tiny_bert", ["query", "value"], BERT_LAYOUT),
                                                    ("tiny_llama", ["q_proj", "v_proj", "down_proj"], LLAMA_LAYOUT)])
def test_stats_of_a_device_mapped_model_equal_the_single_device_ones(request, fixture, targets, layout, tmp_path):
    """A model loaded with a device map (one layer offloaded to disk through accelerate's hooks, as a model
    larger than its GPUs would be) gives the single-device statistics and the same fingerprint."""
    from orthomerge.models import model_fingerprint

    path = request.getfixturevalue(fixture)
    tok = load_tokenizer(path)
    plain = load_model(path)
    mapped = load_model(path, device_map=layout, offload_folder=tmp_path / "offload")
    offloaded = next(k for k, v in layout.items() if v == "disk")
    assert next(p for n, p in mapped.named_parameters() if n.startswith(offloaded)).device.type == "meta"
    assert model_fingerprint(mapped) == model_fingerprint(plain)
    expected = collect_stats(plain, tok, TEXTS, targets, batch_size=5, progress=False)
    got = collect_stats(mapped, tok, TEXTS, targets, batch_size=5, progress=False)
    assert got.groups == expected.groups and got.token_count == expected.token_count
    for key in expected.groups:
        torch.testing.assert_close(got.grams[key], expected.grams[key], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.mean_sum[key], expected.mean_sum[key], rtol=1e-6, atol=1e-6)
    assert got.meta["fingerprint"] == expected.meta["fingerprint"]


def test_stats_cli_device_map(tiny_bert, tmp_path):
    """``stats --device-map FILE.json`` writes the statistics of the single-device run; a bad map is one line."""
    import json

    data = tmp_path / "d.csv"
    data.write_text("text\n" + "\n".join(TEXTS) + "\n")
    (tmp_path / "map.json").write_text(json.dumps(BERT_LAYOUT))
    base = [sys.executable, "-m", "orthomerge.cli", "stats", "--model", tiny_bert, "--data", str(data),
            "--targets", "query,value", "--quiet"]
    for name, extra in (("plain", []), ("mapped", ["--device-map", str(tmp_path / "map.json")])):
        subprocess.run(base + extra + ["--out", str(tmp_path / f"{name}.safetensors")], check=True)
    plain, mapped = load_stats(tmp_path / "plain.safetensors"), load_stats(tmp_path / "mapped.safetensors")
    for key in plain.groups:
        torch.testing.assert_close(mapped.grams[key], plain.grams[key], rtol=1e-6, atol=1e-6)
    bad = subprocess.run(base + ["--device-map", "everywhere", "--out", str(tmp_path / "bad.safetensors")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "device map" in bad.stderr
    assert not (tmp_path / "bad.safetensors").exists()


def test_all_linear_targets_every_linear_module_but_the_head(tiny_llama):
    from orthomerge.models import find_targets, resolve_targets

    model = load_model(tiny_llama)
    names = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert resolve_targets(model, ["all-linear"]) == names
    found = find_targets(model, ["all-linear"])
    assert len(found) == 2 * len(names) and not any(n.startswith("score") for n in found)
