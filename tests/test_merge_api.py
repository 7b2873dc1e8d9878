"""The merge API on real PEFT adapter folders: PEFT as oracle, logits after save → plain PEFT load."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from merge_fixtures import (NUM_LABELS, adapter_dirs, load_base, merge_model_dir, patched_logits,  # noqa: F401
                            peft_logits, rel, tokens)

from orthomerge.adapters import load_adapter
from orthomerge.merge import merge_adapters
from orthomerge.merge import REPORT_NAME

WEIGHTS = [0.5, 1.2, -0.7]


def headless(d, root):
    """A copy of adapter folder ``d`` without its head (PEFT refuses add_weighted_adapter with heads)."""
    from safetensors.torch import load_file, save_file

    out = root / d.name
    if not out.exists():
        out.mkdir(parents=True)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["modules_to_save"] = None
        cfg["task_type"] = None  # SEQ_CLS would add the classifier back
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        tensors = load_file(str(d / "adapter_model.safetensors"))
        save_file({k: v for k, v in tensors.items() if "lora_" in k}, str(out / "adapter_model.safetensors"))
    return out


def peft_model_with(model_dir, dirs, tmp_root=None):
    """A PeftModel holding every adapter under its folder name (PEFT's own scaling is the oracle)."""
    import tempfile

    from peft import PeftModel

    root = Path(tmp_root or tempfile.mkdtemp(prefix="headless"))
    dirs = [headless(d, root) for d in dirs]
    model = PeftModel.from_pretrained(load_base(model_dir), str(dirs[0]), adapter_name=dirs[0].name)
    for d in dirs[1:]:
        model.load_adapter(str(d), adapter_name=d.name)
    return model


def lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name[len(prefix):]: mod for name, mod in peft_model.named_modules() if isinstance(mod, LoraLayer)}


def peft_deltas(model_dir, dirs):
    """{adapter name: {module: s·B@A}} as PEFT computes them."""
    layers = lora_layers(peft_model_with(model_dir, dirs))
    return {d.name: {m: layer.get_delta_weight(d.name).detach().double() for m, layer in layers.items()}
            for d in dirs}


@pytest.fixture(scope="module")
def deltas_by_task(merge_model_dir, adapter_dirs):
    return peft_deltas(merge_model_dir, adapter_dirs)


def weighted_sum(deltas_by_task, weights, dirs):
    modules = deltas_by_task[dirs[0].name]
    return {m: sum(w * deltas_by_task[d.name][m] for w, d in zip(weights, dirs)) for m in modules}


def test_task_arithmetic_equals_peft_cat(merge_model_dir, adapter_dirs, deltas_by_task):
    result = merge_adapters(adapter_dirs, "task_arithmetic", WEIGHTS, model=merge_model_dir)
    peft_model = peft_model_with(merge_model_dir, adapter_dirs)
    peft_model.add_weighted_adapter([d.name for d in adapter_dirs], WEIGHTS, "cat", combination_type="cat")
    for m, layer in lora_layers(peft_model).items():
        ours = result.merged.delta(m).double()
        assert rel(ours, layer.get_delta_weight("cat").double()) < 1e-5
        assert rel(ours, weighted_sum(deltas_by_task, WEIGHTS, adapter_dirs)[m]) < 1e-5
        assert result.merged.rank(m) == sum(load_adapter(d).rank(m) for d in adapter_dirs)


def test_recompressed_task_arithmetic_equals_peft_svd(merge_model_dir, adapter_dirs):
    result = merge_adapters(adapter_dirs, "task_arithmetic", WEIGHTS, rank=4, model=merge_model_dir)
    peft_model = peft_model_with(merge_model_dir, adapter_dirs)
    peft_model.add_weighted_adapter([d.name for d in adapter_dirs], WEIGHTS, "svd", combination_type="svd",
                                    svd_rank=4)
    for m, layer in lora_layers(peft_model).items():
        assert rel(result.merged.delta(m).double(), layer.get_delta_weight("svd").double()) < 1e-5
        full = sum(w * d for w, d in zip(WEIGHTS, [load_adapter(x).delta(m).double() for x in adapter_dirs]))
        s = torch.linalg.svdvals(full)
        expect = float(((s[4:] ** 2).sum() / (s ** 2).sum()).sqrt())
        assert result.report["modules"][m]["rel_error"] == pytest.approx(expect, rel=1e-4)
    assert result.report["total"]["rel_error"] > 0


@pytest.mark.parametrize("ours,theirs", [("ties", "ties_svd"), ("magnitude_prune", "magnitude_prune_svd")])
def test_dense_rules_equal_peft_svd_variants(merge_model_dir, adapter_dirs, ours, theirs):
    """Same rule on dense ΔW then rank-k SVD. Weights 1 (PEFT elects the sign on unweighted values)."""
    ones = [1.0, 1.0, 1.0]
    result = merge_adapters(adapter_dirs, ours, ones, rank=6, density=0.3, svd="exact", model=merge_model_dir)
    peft_model = peft_model_with(merge_model_dir, adapter_dirs)
    peft_model.add_weighted_adapter([d.name for d in adapter_dirs], ones, "x", combination_type=theirs,
                                    svd_rank=6, density=0.3)
    for m, layer in lora_layers(peft_model).items():
        assert rel(result.merged.delta(m).double(), layer.get_delta_weight("x").double()) < 1e-5


def test_saved_adapter_loads_in_plain_peft_with_exact_logits(tmp_path, merge_model_dir, adapter_dirs,
                                                              deltas_by_task):
    out = merge_adapters(adapter_dirs, "task_arithmetic", WEIGHTS, model=merge_model_dir).save(tmp_path / "m")
    expect = weighted_sum(deltas_by_task, WEIGHTS, adapter_dirs)
    assert torch.allclose(peft_logits(merge_model_dir, out), patched_logits(merge_model_dir, expect), atol=1e-5)
    for d in adapter_dirs:
        head = load_adapter(d).heads
        assert set(head) == {"classifier.weight", "classifier.bias"}
        got = peft_logits(merge_model_dir, out / "tasks" / d.name)
        assert torch.allclose(got, patched_logits(merge_model_dir, expect, head), atol=1e-5)
    from safetensors.torch import load_file
    assert not any("classifier" in k for k in load_file(str(out / "adapter_model.safetensors")))
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["method"] == "task_arithmetic" and report["weights"] == WEIGHTS
    assert set(report["timing"]) >= {"merge_s", "save_s"}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] and not cfg["use_rslora"]


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "core_ties", "knots_dare_ties"])
def test_low_rank_methods_roundtrip(tmp_path, merge_model_dir, adapter_dirs, method):
    result = merge_adapters(adapter_dirs, method, WEIGHTS, model=merge_model_dir)
    out = result.save(tmp_path / method)
    expect = {m: result.merged.delta(m) for m in result.merged.modules}
    assert torch.allclose(peft_logits(merge_model_dir, out), patched_logits(merge_model_dir, expect), atol=1e-5)
    assert result.report["total"]["rel_error"] == 0.0


def test_dense_output_loads_with_transformers(tmp_path, merge_model_dir, adapter_dirs):
    from transformers import AutoModelForSequenceClassification

    result = merge_adapters(adapter_dirs, "ties", WEIGHTS, dense=True, model=merge_model_dir, density=0.4)
    out = result.save(tmp_path / "dense")
    for d in adapter_dirs:
        model = AutoModelForSequenceClassification.from_pretrained(str(out / "tasks" / d.name)).eval()
        with torch.no_grad():
            got = model(**tokens()).logits
        expect = patched_logits(merge_model_dir, result.dense[""], load_adapter(d).heads)
        assert torch.allclose(got, expect, atol=1e-5)
    assert (out / "config.json").exists()


def test_dense_rule_recompressed_to_sum_of_ranks_by_default(merge_model_dir, adapter_dirs):
    result = merge_adapters(adapter_dirs, "dare_ties", model=merge_model_dir, density=0.5)
    a = load_adapter(adapter_dirs[0])
    for m in a.modules:
        expect = sum(load_adapter(d).rank(m) for d in adapter_dirs)
        assert result.merged.rank(m) == expect
        assert 0 < result.report["modules"][m]["rel_error"] < 1


def test_emr_writes_one_update_per_task(tmp_path, merge_model_dir, adapter_dirs, deltas_by_task):
    result = merge_adapters(adapter_dirs, "emr", model=merge_model_dir, rank=32)
    out = result.save(tmp_path / "emr")
    assert not (out / "adapter_model.safetensors").exists()
    names = [d.name for d in adapter_dirs]
    modules = list(deltas_by_task[names[0]])
    taus = {m: np.stack([deltas_by_task[n][m].numpy() for n in names]) for m in modules}
    uni, masks = {}, {}
    for m, t in taus.items():
        gamma = np.where(t.sum(0) >= 0, 1.0, -1.0)
        uni[m] = gamma * np.max(np.abs(t) * (np.sign(t) == gamma), 0)
        masks[m] = [t[i] * uni[m] > 0 for i in range(len(names))]
    for i, d in enumerate(adapter_dirs):
        lam = sum(np.abs(taus[m][i]).sum() for m in modules) / sum(np.abs(masks[m][i] * uni[m]).sum()
                                                                   for m in modules)
        expect = {m: lam * masks[m][i] * uni[m] for m in modules}
        assert result.report["rescalers"][d.name] == pytest.approx(lam, rel=1e-5)
        got = peft_logits(merge_model_dir, out / "tasks" / d.name)
        assert torch.allclose(got, patched_logits(merge_model_dir, expect, load_adapter(d).heads), atol=1e-4)


def test_regmean_with_stats_files(tmp_path, merge_model_dir, adapter_dirs, deltas_by_task):
    from orthomerge.stats import ActivationStats, save_stats

    modules = list(deltas_by_task[adapter_dirs[0].name])
    paths, grams = [], []
    for i in range(len(adapter_dirs)):
        g = torch.Generator().manual_seed(40 + i)
        gm = {}
        for m in modules:
            x = torch.randn(50, 32, generator=g, dtype=torch.float64)
            gm[m] = x.T @ x
        st = ActivationStats(groups={m: [m] for m in modules}, grams=gm,
                             mean_sum={m: torch.zeros(32, dtype=torch.float64) for m in modules},
                             token_count=50, sample_count=5)
        paths.append(save_stats(st, tmp_path / f"s{i}.safetensors"))
        grams.append(gm)
    result = merge_adapters(adapter_dirs, "regmean", stats=paths, model=merge_model_dir, alpha=0.95)
    for m in modules:
        gt = [0.95 * g[m] + 0.05 * torch.diag(torch.diagonal(g[m])) for g in grams]
        w0 = torch.randn(32, 32, dtype=torch.float64)
        ws = [w0 + deltas_by_task[d.name][m] for d in adapter_dirs]
        merged = sum(w @ g for w, g in zip(ws, gt)) @ torch.linalg.inv(sum(gt))
        assert rel(result.merged.delta(m).double(), merged - w0) < 1e-5


def test_model_trim_scope(merge_model_dir, adapter_dirs, deltas_by_task):
    """TIES with one threshold per task over all its modules (the TIES reference code's scope)."""
    names = [d.name for d in adapter_dirs]
    modules = list(deltas_by_task[names[0]])
    result = merge_adapters(adapter_dirs, "ties", dense=True, model=merge_model_dir, density=0.3,
                            trim_scope="model")
    for i, n in enumerate(names):
        allv = np.concatenate([deltas_by_task[n][m].abs().numpy().ravel() for m in modules])
        thr = np.sort(allv)[::-1][int(0.3 * allv.size) - 1]
        for m in modules:
            deltas_by_task[n][m + "#t"] = torch.where(deltas_by_task[n][m].abs() >= thr, deltas_by_task[n][m], 0.0)
    for m in modules:
        tw = torch.stack([deltas_by_task[n][m + "#t"] for n in names])
        gamma = torch.where(tw.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(tw) == gamma
        ref = (tw * agree).sum(0) / agree.sum(0).clamp(min=1)
        assert rel(result.dense[""][m].double(), ref) < 1e-5
    for n in names:
        for m in modules:
            del deltas_by_task[n][m + "#t"]
