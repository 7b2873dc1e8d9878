"""The data-driven methods (fisher, adamerging, search) on their REAL path: a tiny base model and real task
rows, so the Fisher is computed, AdaMerging's coefficients are learned and the search scores candidates.

Properties: one adapter at weight 1 returns it (where that is the method's definition, else the exact
structure the method promises), and the adapters' order does not matter (permuting the adapters together
with their data gives the same merged ΔW per module and the same per-task outputs). Oracles: the input
adapters' own factors, PEFT's forward pass of the saved folders, and a hand-written scorer for the search.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TEXTS
from merge_fixtures import make_adapter, rel

from orthomerge.adapters import load_adapter
from orthomerge.merge import merge_adapters, run_recipe
from orthomerge.tasks import Split, Task

ORDER = [2, 0, 1]            # a permutation with no fixed point
TOL = 1e-5


# ---------------------------------------------------------------- fixtures and oracles


def rows(n: int, seed: int, offset: int = 0) -> Split:
    """n rows of TEXTS (cyclic, from ``offset``) with random 0/1 labels: a different task per seed."""
    rng = np.random.default_rng(seed)
    texts = [TEXTS[(offset + k) % len(TEXTS)] for k in range(n)]
    return Split(texts, [int(v) for v in rng.integers(0, 2, n)])


def make_task(name: str, seed: int, n: int = 10) -> Task:
    train, val = rows(n, seed, offset=seed), rows(n, seed + 100, offset=3 * seed)
    return Task(name, ["a", "b"], "accuracy", train, val, val)


@pytest.fixture(scope="module")
def adapters3(tiny_bert, tmp_path_factory):
    """Three SEQ_CLS adapters on the tiny BERT (different ranks and alphas, random heads) and one task each."""
    root = tmp_path_factory.mktemp("real_path")
    dirs = [make_adapter(tiny_bert, root / "t0", r=2, alpha=4, seed=21, num_labels=2),
            make_adapter(tiny_bert, root / "t1", r=3, alpha=3, seed=22, num_labels=2),
            make_adapter(tiny_bert, root / "t2", r=1, alpha=2, seed=23, num_labels=2)]
    tasks = [make_task(f"task{i}", seed=5 + i) for i in range(3)]
    return dirs, tasks


def base_model(model_dir: str):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()


def encode(model_dir: str, texts) -> dict:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(list(texts), padding=True, truncation=True, max_length=64,
                                                    return_tensors="pt")


def peft_task_logits(model_dir: str, folder, texts) -> torch.Tensor:
    """Logits of a saved PEFT folder (LoRA + head) through plain ``PeftModel.from_pretrained``."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model(model_dir), str(folder)).eval()
    with torch.no_grad():
        return model(**encode(model_dir, texts)).logits


def dense_logits(model_dir: str, deltas: dict, heads: dict, texts) -> torch.Tensor:
    """Logits of W₀ + ΔW patched by hand into the base, with the given head tensors."""
    model = base_model(model_dir)
    state = model.state_dict()
    with torch.no_grad():
        for m, d in deltas.items():
            state[f"{m}.weight"] += torch.as_tensor(d, dtype=torch.float32)
        for k, v in heads.items():
            state[k].copy_(v)
        return model(**encode(model_dir, texts)).logits


def check_permutation(result, other, dirs, tasks, model_dir, tmp_path, split="validation"):
    """Same ΔW per module, and every task's own output folder (merged LoRA + its head, read by PEFT)
    gives the same logits on that task's rows in both orders."""
    modules = load_adapter(dirs[0]).modules
    for m in modules:
        assert rel(other.delta(m).numpy(), result.delta(m).numpy()) < TOL, m
    a, b = result.save(tmp_path / "given"), other.save(tmp_path / "permuted")
    for d, t in zip(dirs, tasks):
        texts = getattr(t, split).texts
        la = peft_task_logits(model_dir, a / "tasks" / d.name, texts)
        lb = peft_task_logits(model_dir, b / "tasks" / d.name, texts)
        assert rel(lb.numpy(), la.numpy()) < TOL, d.name
        # and the folder is what it claims: W₀ + merged ΔW with this task's own head
        own = load_adapter(d)
        ref = dense_logits(model_dir, {m: result.delta(m) for m in modules}, own.heads, texts)
        assert rel(la.numpy(), ref.numpy()) < 1e-4, d.name


def permute(items, order=ORDER):
    return [items[i] for i in order]


# ---------------------------------------------------------------- Fisher


def test_fisher_one_adapter_is_itself_with_a_real_fisher(tiny_bert, adapters3):
    dirs, tasks = adapters3
    result = merge_adapters(dirs[:1], "fisher", weights=[1.0], data=tasks[:1], model=tiny_bert, samples=8,
                            batch_size=4)
    rep = result.report["fisher"]
    assert rep["examples"] == {"t0": 8} and rep["split"] == "train"
    assert math.isfinite(rep["norms"]["t0"]) and rep["norms"]["t0"] > 0       # a Fisher was computed
    a = load_adapter(dirs[0])
    for m in a.modules:           # Σ c F ⊙ ΔW / Σ |c| F = ΔW for one task with c > 0, whatever F is
        assert rel(result.delta(m).numpy(), a.delta(m).numpy()) < TOL, m


@pytest.mark.parametrize("labels", ["expected", "sample"])
def test_fisher_order_does_not_matter(tiny_bert, adapters3, tmp_path, labels):
    dirs, tasks = adapters3
    weights = [1.0, 0.6, 1.4]
    kw = dict(model=tiny_bert, samples=8, batch_size=4, labels=labels)
    result = merge_adapters(dirs, "fisher", weights=weights, data=tasks, **kw)
    other = merge_adapters(permute(dirs), "fisher", weights=permute(weights), data=permute(tasks), **kw)
    rep, rep2 = result.report["fisher"], other.report["fisher"]
    assert rep["examples"] == {"t0": 8, "t1": 8, "t2": 8}
    for name, norm in rep["norms"].items():       # each task's Fisher is its own, whatever its position
        assert norm > 0 and rep2["norms"][name] == pytest.approx(norm, rel=1e-5)
    # the Fisher really weights the merge: it is not the isotropic (F = 1) weighted average
    adapters = [load_adapter(d) for d in dirs]
    m = adapters[0].modules[0]
    iso = sum(w * a.delta(m) for w, a in zip(weights, adapters)) / sum(weights)
    assert rel(result.delta(m).numpy(), iso.numpy()) > 1e-2
    check_permutation(result, other, dirs, tasks, tiny_bert, tmp_path, split="train")


# ---------------------------------------------------------------- AdaMerging


def test_adamerging_one_adapter_is_its_learned_lambda_times_itself(tiny_bert, adapters3, tmp_path):
    dirs, tasks = adapters3
    result = merge_adapters(dirs[:1], "adamerging", data=tasks[:1], model=tiny_bert, steps=8, lr=0.05,
                            batch_size=4, samples=8)
    out = result.save(tmp_path / "ada")
    saved = json.loads((out / "merge_report.json").read_text())["adamerging"]
    rep = result.report["adamerging"]
    assert saved["coefficients"] == rep["coefficients"] and rep["examples"] == {"t0": 8}
    assert len(rep["loss_curve"]) == 8
    a = load_adapter(dirs[0])
    assert set(rep["coefficients"]) == set(a.modules)
    for m in a.modules:
        lam = rep["coefficients"][m]["t0"]
        assert abs(lam - 0.3) > 1e-2, (m, lam)                 # learned: moved from init 0.3
        assert rel(result.delta(m).numpy(), (lam * a.delta(m)).numpy()) < TOL, m
    written = load_adapter(out)                                  # and the saved PEFT folder holds it
    for m in a.modules:
        assert rel(written.delta(m).numpy(), result.delta(m).numpy()) < TOL, m


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_adamerging_order_does_not_matter(tiny_bert, adapters3, tmp_path, granularity):
    """Batches are drawn per task (4 of 10 rows each step), so each task must get the same batches in any order."""
    dirs, tasks = adapters3
    kw = dict(model=tiny_bert, steps=6, lr=0.05, batch_size=4, granularity=granularity)
    result = merge_adapters(dirs, "adamerging", data=tasks, **kw)
    other = merge_adapters(permute(dirs), "adamerging", data=permute(tasks), **kw)
    rep, rep2 = result.report["adamerging"], other.report["adamerging"]
    coeffs = rep["coefficients"] if granularity == "task" else rep["coefficients"][load_adapter(dirs[0]).modules[0]]
    assert all(abs(v - 0.3) > 1e-2 for v in coeffs.values()), coeffs      # learned, not the init
    flat = lambda c: {k: v for k, v in (c.items() if granularity == "task" else  # noqa: E731
                                        ((f"{m}/{n}", v) for m, d in c.items() for n, v in d.items()))}
    c1, c2 = flat(rep["coefficients"]), flat(rep2["coefficients"])
    assert c1.keys() == c2.keys()
    for k in c1:
        assert c2[k] == pytest.approx(c1[k], abs=1e-5), k
    for key in ("entropy_init", "entropy_final"):
        for name, v in rep[key].items():
            assert rep2[key][name] == pytest.approx(v, rel=1e-5), (key, name)
    check_permutation(result, other, dirs, tasks, tiny_bert, tmp_path)


# ---------------------------------------------------------------- search


def accuracy(logits: torch.Tensor, labels) -> float:
    hits = (logits.argmax(-1) == torch.tensor(labels)).tolist()
    return sum(hits) / len(hits)


def test_search_one_adapter_task_arithmetic_at_one_is_itself(tiny_bert, adapters3):
    dirs, tasks = adapters3
    result = merge_adapters(dirs[:1], "search", data=tasks[:1], model=tiny_bert, methods="task_arithmetic",
                            lambdas="1.0", min_samples=4)
    rep = result.report["search"]
    assert rep["best"]["method"] == "task_arithmetic" and rep["best"]["lambda"] == 1.0
    assert rep["fidelities"] == [4, 10]
    assert [(t["rung"], t["samples"]) for t in rep["trials"]] == [(0, 4), (1, 10)]   # scored on every rung
    own = load_adapter(dirs[0])
    val = tasks[0].validation
    own_acc = accuracy(peft_task_logits(tiny_bert, dirs[0], val.texts), val.labels)
    assert own_acc > 0
    for t in rep["trials"]:                    # the merge is the adapter itself: normalised score exactly 1
        assert t["score"] == pytest.approx(1.0)
    for m in own.modules:
        assert rel(result.delta(m).numpy(), own.delta(m).numpy()) < TOL, m


SEARCH = dict(methods="task_arithmetic,ties,tsv", lambdas="0.5,1.0", densities="0.2,0.6", min_samples=4)


@pytest.fixture(scope="module")
def searched(tiny_bert, adapters3, tmp_path_factory):
    dirs, tasks = adapters3
    result = merge_adapters(dirs, "search", data=tasks, model=tiny_bert, **SEARCH)
    return result, result.save(tmp_path_factory.mktemp("searched") / "out")


def test_search_scores_candidates_as_an_independent_scorer_does(tiny_bert, adapters3, searched):
    """Every trial's score is the mean over tasks of (accuracy of the candidate with the task's head on the
    first n validation rows) / (the task's own adapter's accuracy on them), recomputed here by hand; the
    winner is the best at the last rung."""
    dirs, tasks = adapters3
    result, _ = searched
    rep = result.report["search"]
    assert rep["fidelities"] == [4, 10]
    assert sum(t["rung"] == 0 for t in rep["trials"]) == 8          # 2 TA + 2×2 TIES + 2 TSV candidates
    assert 0 < sum(t["rung"] == 1 for t in rep["trials"]) <= 3      # top ⌈8/3⌉ promoted
    adapters = [load_adapter(d) for d in dirs]
    modules = adapters[0].modules
    own = {(i, n): accuracy(peft_task_logits(tiny_bert, d, t.validation.texts[:n]), t.validation.labels[:n])
           for i, (d, t) in enumerate(zip(dirs, tasks)) for n in rep["fidelities"]}
    merged = {}
    for t in rep["trials"]:
        key = (t["method"], json.dumps(t["params"], sort_keys=True))
        if key not in merged:
            r = merge_adapters(dirs, t["method"], dense=True, model=tiny_bert, scale=1.0, **t["params"])
            merged[key] = {m: r.delta(m) for m in modules}
        deltas = {m: d * t["lambda"] for m, d in merged[key].items()}
        n, scores = t["samples"], []
        for i, (a, task) in enumerate(zip(adapters, tasks)):
            acc = accuracy(dense_logits(tiny_bert, deltas, a.heads, task.validation.texts[:n]),
                           task.validation.labels[:n])
            scores.append(acc / own[(i, n)] if own[(i, n)] else acc)
        assert t["score"] == pytest.approx(float(np.mean(scores)), abs=1e-9), t
    last = [t for t in rep["trials"] if t["rung"] == 1]
    assert rep["best"]["score"] == max(t["score"] for t in last)
    assert any(t["method"] == rep["best"]["method"] and t["params"] == rep["best"]["params"]
               and t["lambda"] == rep["best"]["lambda"] and t["score"] == rep["best"]["score"] for t in last)


def test_search_result_is_the_merge_its_recipe_describes(tiny_bert, adapters3, searched, tmp_path):
    dirs, tasks = adapters3
    result, out = searched
    best = result.report["search"]["best"]
    again = run_recipe(out / "recipe.yaml", out=tmp_path / "again")
    assert again.method == best["method"] and again.params["scale"] == best["lambda"]
    for k, v in best["params"].items():
        assert again.params[k] == v
    direct = merge_adapters(dirs, best["method"], scale=best["lambda"], **best["params"])   # same output form
    for m in again.merged.modules:
        assert rel(again.delta(m).numpy(), result.delta(m).numpy()) < TOL, m
        assert rel(result.delta(m).numpy(), direct.delta(m).numpy()) < TOL, m


def test_search_order_does_not_matter(tiny_bert, adapters3, searched, tmp_path):
    dirs, tasks = adapters3
    result, _ = searched
    other = merge_adapters(permute(dirs), "search", data=permute(tasks), model=tiny_bert, **SEARCH)
    rep, rep2 = result.report["search"], other.report["search"]
    assert {k: rep2["best"][k] for k in ("method", "params", "lambda")} == \
        {k: rep["best"][k] for k in ("method", "params", "lambda")}
    assert len(rep2["trials"]) == len(rep["trials"])
    for t1, t2 in zip(rep["trials"], rep2["trials"]):
        assert (t2["method"], t2["params"], t2["lambda"], t2["rung"]) == \
            (t1["method"], t1["params"], t1["lambda"], t1["rung"])
        assert t2["score"] == pytest.approx(t1["score"], abs=1e-12)
    check_permutation(result, other, dirs, tasks, tiny_bert, tmp_path)


def test_model_passes_of_data_driven_methods_get_the_callers_threads(adapters3, tiny_bert, monkeypatch):
    """The merge's rules run on ``threads`` (1), a data-driven method's model passes on the caller's count."""
    import orthomerge.merge.fisher as fisher_module

    dirs, tasks = adapters3
    seen = {}
    real = fisher_module.diagonal_fisher

    def spy(*args, **kwargs):
        seen.setdefault("fisher", torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(fisher_module, "diagonal_fisher", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        merge_adapters(dirs, "fisher", model=tiny_bert, data=tasks, samples=4, threads=1, dense=True)
    finally:
        torch.set_num_threads(before)
    assert seen["fisher"] == 2
