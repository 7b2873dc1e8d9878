"""Continual (OPCM), DO-Merging, DOGE, Fisher, AdaMerging and search: dense / brute-force references,
the properties each method promises, and the data plumbing (API, YAML, CLI)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TEXTS
from merge_fixtures import adapter_dirs, make_adapter, merge_model_dir, random_task, rel, update  # noqa: F401

from orthomerge import cli
from orthomerge.adapters import load_adapter
from orthomerge.errors import OrthomergeError
from orthomerge.merge import get_method, merge_adapters, run_recipe
from orthomerge.merge import load_recipe
from orthomerge.merge.search import RECIPE_NAME
from orthomerge.merge.continual import ContinualMerger
from orthomerge.merge.data import TaskModels
from orthomerge.merge.do_merging import orthogonalise
from orthomerge.merge.doge import refine, shared_basis
from orthomerge.merge.fisher import diagonal_fisher
from orthomerge.merge.registry import MergeContext
from orthomerge.merge.search import fidelities, grid, successive_halving
from orthomerge.tasks import Split, Task

EPS32 = np.finfo(np.float32).eps


def run(name, task, **params):
    spec = get_method(name)
    return spec.fn(task, **spec.resolve(params))


# ---------------------------------------------------------------- continual (OPCM)


def ref_opcm(taus: dict, alpha: float) -> dict:
    """The reference code's definition on dense matrices (full SVDs; the diagonal over the numerical rank)."""
    modules = list(taus)
    count = len(taus[modules[0]])
    merged = {m: taus[m][0].copy() for m in modules}
    for t in range(1, count):
        for m in modules:
            u, s, vh = np.linalg.svd(merged[m])
            rho = int((s > max(s.shape[0], *merged[m].shape) * EPS32 * s[0]).sum())
            k = int(np.argmax(np.cumsum(s) / s.sum() > alpha))       # FusionBench's split_rank
            p = u.T @ taus[m][t] @ vh.T
            p[np.arange(rho), np.arange(rho)] = 0.0
            p[:k, :k] = 0.0
            merged[m] = merged[m] + u @ p @ vh
    mean = np.mean([np.sqrt(sum((taus[m][i] ** 2).sum() for m in modules)) for i in range(count)])
    total = np.sqrt(sum((merged[m] ** 2).sum() for m in modules))
    return {m: merged[m] * mean / total for m in modules}


def test_continual_stream_equals_dense_definition():
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (24, 20), "v": (18, 22)}
    updates = [{m: (torch.randn(a, 3, generator=g) * (1 + i), torch.randn(3, b, generator=g) / b ** 0.5)
                for m, (a, b) in shapes.items()} for i in range(4)]
    merger = ContinualMerger(alpha=0.5)
    for u in updates:                        # one at a time
        merger.add(u)
    ref = ref_opcm({m: [(u[m][0].double() @ u[m][1].double()).numpy() for u in updates] for m in shapes}, 0.5)
    for m in shapes:
        assert rel(update(merger.delta(m)), ref[m]) < 1e-6
        assert merger.states[m][1].numel() <= 12       # factored state, rank ≤ Σr
    assert len(merger.lambdas) == 4 and merger.lambdas[0] == pytest.approx(1.0)


def test_continual_api_matches_definition_and_shuffle_ignores_list_order(adapter_dirs):
    adapters = [load_adapter(d) for d in adapter_dirs]
    modules = adapters[0].modules
    got = merge_adapters(adapter_dirs, "continual", order="given", alpha=0.3)
    ref = ref_opcm({m: [a.delta(m).double().numpy() for a in adapters] for m in modules}, 0.3)
    for m in modules:
        assert rel(got.delta(m).numpy(), ref[m]) < 1e-5
    assert got.report["continual"]["order"] == [d.name for d in adapter_dirs]
    one = merge_adapters(adapter_dirs, "continual")
    other = merge_adapters(adapter_dirs[::-1], "continual")
    assert one.report["continual"]["order"] == other.report["continual"]["order"]
    for m in modules:
        assert rel(other.delta(m).numpy(), one.delta(m).numpy()) < 1e-6
    capped = merge_adapters(adapter_dirs, "continual", max_rank=2)
    assert max(capped.report["continual"]["ranks"].values()) <= 2 and capped.report["continual"]["discarded_energy"] > 0


# ---------------------------------------------------------------- DO-Merging


def brute_orthogonalise(blocks, gamma, steps, lr):
    """Autograd gradient descent on the normalised loss, written out directly."""
    norms = [b.double().norm() for b in blocks]
    base = [b.double() / n for b, n in zip(blocks, norms)]
    deltas = [torch.zeros_like(b) for b in base]
    for _ in range(steps):
        ds = [d.clone().requires_grad_() for d in deltas]
        xs = [b + d for b, d in zip(base, ds)]
        loss = sum(((xi @ xj.T) ** 2).sum() for i, xi in enumerate(xs) for j, xj in enumerate(xs) if i != j)
        loss = loss + gamma * sum((d ** 2).sum() for d in ds)
        grads = torch.autograd.grad(loss, ds)
        step = lr / (4 * sum(float((x.detach() ** 2).sum()) for x in xs) + 2 * gamma)
        deltas = [d.detach() - step * gr for d, gr in zip(ds, grads)]
    return [(b + d) * n for b, d, n in zip(base, deltas, norms)]


@pytest.mark.parametrize("magnitude", ["row", "column"])
@pytest.mark.parametrize("direction", ["sum", "normalize"])
def test_do_merging_matches_dense_brute_force(magnitude, direction):
    task = random_task(ranks=(3, 2, 4), weights=(1.0, 0.5, -0.8), seed=31)
    a_hat = brute_orthogonalise([a for _, a in task.factors], 0.5, 20, 1.0)
    b_hat = [x.T for x in brute_orthogonalise([b.T for b, _ in task.factors], 0.5, 20, 1.0)]
    ws = [b @ a for b, a in zip(b_hat, a_hat)]
    axis = 1 if magnitude == "row" else 0
    mags = [w.norm(dim=axis, keepdim=True) for w in ws]
    mean = sum(mags) / len(mags)
    direc = sum(wt * w / mu for wt, w, mu in zip(task.weights, ws, mags))
    if direction == "normalize":
        direc = direc / direc.norm(dim=axis, keepdim=True)
    ref = 0.9 * mean * direc
    got = update(run("do_merging", task, gamma=0.5, steps=20, scale=0.9, magnitude=magnitude, direction=direction))
    assert rel(got, ref.numpy()) < 1e-5


def orthogonality_loss(rows: list[torch.Tensor], perturbed: list[torch.Tensor], gamma: float) -> float:
    """Test-side oracle: Σ_{i≠j}‖X̂_i X̂_jᵀ‖²_F + γ Σ_i‖X̂_i − X̃_i‖²_F on blocks normalised by the originals' norms."""
    total = 0.0
    norms = [float(x.norm()) or 1.0 for x in rows]
    xs = [p.to(torch.float64) / n for p, n in zip(perturbed, norms)]
    for i, xi in enumerate(xs):
        for j, xj in enumerate(xs):
            if i != j:
                total += float(((xi @ xj.T) ** 2).sum())
        total += gamma * float(((xi - rows[i].to(torch.float64) / norms[i]) ** 2).sum())
    return total


def test_do_merging_orthogonalisation_lowers_cross_products():
    task = random_task(ranks=(4, 4, 4), seed=32)
    rows = [b.T for b, _ in task.factors]
    out = orthogonalise(rows, 1.0, 100, 1.0)
    assert [tuple(o.shape) for o in out] == [tuple(r.shape) for r in rows]
    # the cross-Grams shrink (γ = 0: the cross terms alone), and the regularised objective it descends drops
    assert orthogonality_loss(rows, out, 0.0) < 0.5 * orthogonality_loss(rows, rows, 0.0)
    assert orthogonality_loss(rows, out, 1.0) < orthogonality_loss(rows, rows, 1.0)
    # with γ large the perturbation is held back: the blocks barely move
    stiff = orthogonalise(rows, 1e6, 100, 1.0)
    assert max(rel(s.numpy(), r.double().numpy()) for s, r in zip(stiff, rows)) < 1e-3


# ---------------------------------------------------------------- DOGE


def gap_loss(taus: list[torch.Tensor], lambdas: list[float], delta: torch.Tensor) -> float:
    """Test-side oracle: L(δ) = Σ_j Σ_rows ⟨τ_j[r], τ_j[r] − M[r]⟩², M = Σ_i λ_i τ_i + (Σ_i λ_i) δ."""
    merged = sum(l * t for l, t in zip(lambdas, taus)) + sum(lambdas) * delta
    return float(sum(((t * (t - merged)).sum(1) ** 2).sum() for t in taus))


def test_doge_objective_decreases_and_stays_off_the_shared_subspace():
    task = random_task(m=30, n=26, ranks=(4, 3, 4), seed=33)
    taus = [b.double() @ a.double() for b, a in task.factors]
    norms = [float(t.norm()) for t in taus]
    lambdas = [np.mean(norms) / n for n in norms]
    basis = shared_basis(task, 2.0)
    assert basis.shape[1] == 5                     # ⌊ρ = 11 / 2⌋ most shared directions
    history = []
    delta = refine(taus, lambdas, basis, 60, 0.1, history)
    assert history[0] == pytest.approx(gap_loss(taus, lambdas, torch.zeros_like(taus[0])), rel=1e-9)
    assert history[-1] < 0.5 * history[0]
    assert gap_loss(taus, lambdas, delta) < gap_loss(taus, lambdas, torch.zeros_like(delta))
    assert float((basis.T @ delta).norm()) < 1e-9 * float(delta.norm()) + 1e-12
    out = update(run("doge", task, steps=60, subspace=2.0, density=0.3, trim_scope="tensor"))
    assert np.count_nonzero(out) < out.size       # top-k masks applied


def test_doge_first_step_follows_the_autograd_gradient():
    """Adam's first step is −lr·sign(g): compare with the sign of the autograd gradient of the objective."""
    task = random_task(m=12, n=10, ranks=(2, 3), seed=34)
    taus = [b.double() @ a.double() for b, a in task.factors]
    lambdas = [0.7, 1.3]
    d = torch.zeros_like(taus[0], requires_grad=True)
    merged = sum(l * t for l, t in zip(lambdas, taus)) + sum(lambdas) * d
    loss = sum(((t * (t - merged)).sum(1) ** 2).sum() for t in taus)
    (grad,) = torch.autograd.grad(loss, d)
    rms = float(torch.stack([(t * t).mean() for t in taus]).mean().sqrt())
    step = refine(taus, lambdas, torch.zeros(12, 0, dtype=torch.float64), 1, 1e-3)
    big = grad.abs() > 1e-6 * grad.abs().max()
    assert torch.allclose(step[big], -1e-3 * rms * torch.sign(grad[big]), rtol=1e-6)


def test_doge_one_adapter_model_scope_is_identity(adapter_dirs):
    got = merge_adapters(adapter_dirs[:1], "doge", density=1.0, steps=20)
    a = load_adapter(adapter_dirs[0])
    for m in a.modules:
        assert rel(got.delta(m).numpy(), a.delta(m).numpy()) < 1e-5


# ---------------------------------------------------------------- data-driven: fixtures


def split(n: int = 8, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(list(TEXTS[:n]), [int(v) for v in rng.integers(0, 2, n)])


def task(name: str, seed: int) -> Task:
    s = split(12, seed)
    return Task(name, ["a", "b"], "accuracy", s, s, s)


@pytest.fixture(scope="module")
def bert_adapters(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("learned")
    return [make_adapter(tiny_bert, root / f"t{i}", r=2, alpha=4, seed=10 + i, num_labels=2) for i in range(2)]


# ---------------------------------------------------------------- Fisher


def brute_fisher(model_dir, adapter, data, mode):
    """One example at a time, autograd w.r.t. the dense W = W₀ + ΔW of every module."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    state = model.state_dict()
    with torch.no_grad():
        for m in adapter.modules:
            state[f"{m}.weight"] += adapter.delta(m)
        for k, v in adapter.heads.items():
            state[k].copy_(v)
    weights = [model.get_submodule(m).weight for m in adapter.modules]
    out = [torch.zeros_like(w) for w in weights]
    for text, label in zip(data.texts, data.labels):
        logp = torch.log_softmax(model(**tok(text, return_tensors="pt", truncation=True, max_length=32)).logits[0], -1)
        classes = range(2) if mode == "expected" else [label]
        for c in classes:
            grads = torch.autograd.grad(logp[c], weights, retain_graph=True)
            p = float(logp[c].detach().exp()) if mode == "expected" else 1.0
            for o, g in zip(out, grads):
                o += p * g * g
    return {m: o / len(data) for m, o in zip(adapter.modules, out)}


@pytest.mark.parametrize("mode", ["expected", "gold"])
def test_fisher_matches_brute_force(tiny_bert, bert_adapters, mode):
    from orthomerge.models import load_model, load_tokenizer

    adapter = load_adapter(bert_adapters[0])
    data = split(6)
    model = load_model(tiny_bert)
    models = TaskModels(model, [adapter], ["t0"])
    got = diagonal_fisher(models.get(0), load_tokenizer(tiny_bert), data, {m: adapter.scaled_factors(m) for m in adapter.modules},
                          mode, max_length=32, batch_size=4)
    ref = brute_fisher(tiny_bert, adapter, data, mode)
    for m in adapter.modules:
        assert rel(got[m].numpy(), ref[m].numpy()) < 1e-4


def test_fisher_rule_matches_formula():
    t = random_task(ranks=(3, 2), weights=(1.0, 2.0), seed=35)
    g = torch.Generator().manual_seed(1)
    fishers = [torch.rand(t.shape, generator=g) ** 3 for _ in range(2)]
    norms = [2.0, 0.5]
    t.extras = {"fisher": fishers, "fisher_norms": norms}
    ds = [(b.double() @ a.double()).numpy() for b, a in t.factors]
    for normalize in (True, False):
        c = [w / (n + 1e-6) if normalize else w for w, n in zip(t.weights, norms)]
        f = [fi.double().numpy() + 1e-6 for fi in fishers]
        ref = 0.8 * sum(ci * fi * d for ci, fi, d in zip(c, f, ds)) / sum(ci * fi for ci, fi in zip(c, f))
        assert rel(update(run("fisher", t, scale=0.8, normalize_fisher=normalize)), ref) < 1e-5


def fisher_formula(adapters, weights, fishers, normalize: bool, floor: float = 1e-6, scale: float = 1.0):
    """ΔW = λ Σ c_i F̃_i ⊙ ΔW_i / Σ |c_i| F̃_i, c_i = w_i / (‖F_i‖ + floor) (norm over all modules) or w_i."""
    norms = [float(sum((f.double() ** 2).sum() for f in fi.values())) ** 0.5 for fi in fishers]
    c = [w / (n + floor) if normalize else w for w, n in zip(weights, norms)]
    out = {}
    for m in adapters[0].modules:
        f = [fi[m].double() + floor for fi in fishers]
        num = sum(ci * fi * a.delta(m).double() for ci, fi, a in zip(c, f, adapters))
        out[m] = scale * num / sum(abs(ci) * fi for ci, fi in zip(c, f))
    return out, norms


def test_fisher_through_the_api(tiny_bert, bert_adapters):
    data = [split(8, 1), Split(list(TEXTS[6:14]), split(8, 2).labels)]     # different rows per task
    got = merge_adapters(bert_adapters, "fisher", data=data, model=tiny_bert, samples=6, batch_size=3,
                         weights=[1.0, 0.5], dense=True)
    assert got.report["fisher"]["examples"] == {"t0": 6, "t1": 6}
    adapters = [load_adapter(d) for d in bert_adapters]   # each task's Fisher on its own first 6 rows, by autograd
    ref, norms = fisher_formula(adapters, [1.0, 0.5],
                                [brute_fisher(tiny_bert, a, d.take(6), "expected") for a, d in zip(adapters, data)],
                                normalize=True)
    for m in adapters[0].modules:
        assert rel(got.delta(m).numpy(), ref[m].numpy()) < 1e-4, m
    assert [got.report["fisher"]["norms"][n] for n in ("t0", "t1")] == pytest.approx(norms, rel=1e-4)
    one = merge_adapters(bert_adapters[:1], "fisher", data=data[:1], model=tiny_bert, samples=4)
    a = load_adapter(bert_adapters[0])
    for m in a.modules:
        assert rel(one.delta(m).numpy(), a.delta(m).numpy()) < 1e-5      # one adapter: itself


@pytest.mark.parametrize("method", ["fisher", "adamerging", "search"])
def test_data_methods_need_data_and_model(bert_adapters, tiny_bert, method):
    with pytest.raises(OrthomergeError, match="needs task data"):
        merge_adapters(bert_adapters, method, model=tiny_bert)
    with pytest.raises(OrthomergeError, match="items for 2 adapters"):
        merge_adapters(bert_adapters, method, model=tiny_bert, data=[split()])


# ---------------------------------------------------------------- AdaMerging


def test_adamerging_hooks_equal_the_dense_merge(tiny_bert, bert_adapters):
    from orthomerge.merge.adamerging import _Merged
    from orthomerge.models import load_model, load_tokenizer

    adapters = [load_adapter(d) for d in bert_adapters]
    model = load_model(tiny_bert)
    ctx = MergeContext(adapters, ["t0", "t1"], adapters[0].modules, [1.0, -0.5], {}, model)
    lam = torch.tensor([[0.3, 0.7], [1.1, 0.2]]).repeat(2, 1)       # layer-wise, 4 modules
    merged = _Merged(ctx, lam, layerwise=True)
    models = TaskModels(model, adapters, ctx.names)
    batch = load_tokenizer(tiny_bert)(TEXTS[:5], padding=True, return_tensors="pt")
    with torch.no_grad(), merged.hooks(models.get(1)):
        hooked = models.get(1)(**batch).logits
        dense = {m: sum(lam[k, i] * w * a.delta(m) for i, (a, w) in enumerate(zip(adapters, ctx.weights)))
                 for k, m in enumerate(ctx.modules)}
    from orthomerge.merge.search import patched

    with torch.no_grad(), patched(models.get(1), dense) as patched_model:
        ref = patched_model(**batch).logits
    assert rel(hooked.numpy(), ref.numpy()) < 1e-5


def mean_entropy_of(model_dir, deltas, heads, texts) -> float:
    """Mean prediction entropy of W₀ + ΔW with the given head over ``texts`` (one text at a time)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    state = model.state_dict()
    total = 0.0
    with torch.no_grad():
        for m, d in deltas.items():
            state[f"{m}.weight"] += d
        for k, v in heads.items():
            state[k].copy_(v)
        for text in texts:
            p = torch.softmax(model(**tok(text, return_tensors="pt", truncation=True, max_length=64)).logits[0], -1)
            total += float(-(p * p.log()).sum())
    return total / len(texts)


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_adamerging_lowers_the_entropy_it_minimises(tiny_bert, bert_adapters, granularity):
    data = [split(10, 3), split(10, 4)]
    got = merge_adapters(bert_adapters, "adamerging", data=data, model=tiny_bert, steps=25, lr=0.05,
                         granularity=granularity, batch_size=5)
    rep = got.report["adamerging"]
    adapters = [load_adapter(d) for d in bert_adapters]
    modules = adapters[0].modules
    # the entropy of each task's rows with its own head, recomputed here: at the init λ = 0.3 and at the result
    init = {m: 0.3 * sum(a.delta(m) for a in adapters) for m in modules}
    final = {m: got.delta(m) for m in modules}
    before = [mean_entropy_of(tiny_bert, init, a.heads, d.texts) for a, d in zip(adapters, data)]
    after = [mean_entropy_of(tiny_bert, final, a.heads, d.texts) for a, d in zip(adapters, data)]
    assert sum(after) < sum(before) - 1e-3
    assert [rep["entropy_init"][n] for n in ("t0", "t1")] == pytest.approx(before, rel=1e-4)
    assert [rep["entropy_final"][n] for n in ("t0", "t1")] == pytest.approx(after, rel=1e-4)
    assert len(rep["loss_curve"]) == 25 and rep["loss_curve"][-1] < rep["loss_curve"][0]
    m = adapters[0].modules[0]
    coef = rep["coefficients"][m] if granularity == "layer" else rep["coefficients"]
    ref = sum(coef[n] * a.delta(m) for n, a in zip(["t0", "t1"], adapters))
    assert rel(got.delta(m).numpy(), ref.numpy()) < 1e-5


# ---------------------------------------------------------------- search


def test_search_finds_the_planted_best(adapter_dirs, merge_model_dir):
    adapters = [load_adapter(d) for d in adapter_dirs]
    modules = adapters[0].modules

    def merge(method, params):
        extra = {"scale": 1.0} if "scale" in get_method(method).defaults else {}
        r = merge_adapters(adapters, method, dense=True, model=merge_model_dir, **params, **extra)
        return {m: r.delta(m) for m in modules}

    target = {m: d * 0.75 for m, d in merge("ties", {"density": 0.2}).items()}
    total = sum(float((t ** 2).sum()) for t in target.values())
    calls = []

    def scorer(deltas, n):        # closer to the planted merge is better; low fidelity is noisier
        calls.append(n)
        dist = sum(float(((deltas[m] - target[m]) ** 2).sum()) for m in modules) / total
        return -dist + 0.01 * np.sin(len(calls)) / np.sqrt(n)

    groups = grid("task_arithmetic,ties,tsv,continual", "0.25,0.5,0.75,1.0", "0.1,0.2,0.4")
    rungs = fidelities(4, 100, 3)
    assert rungs == [4, 12, 36, 100]
    out = successive_halving(groups, merge, scorer, rungs, 3)
    assert out.best == ("ties", {"density": 0.2}, 0.75)
    per_rung = [sum(1 for t in out.trials if t.rung == k) for k in range(len(rungs))]
    assert per_rung[0] == 24 and per_rung == sorted(per_rung, reverse=True)


def test_search_end_to_end_writes_a_loadable_recipe(tiny_bert, bert_adapters, tmp_path):
    tasks = [task("t0", 5), task("t1", 6)]
    result = merge_adapters(bert_adapters, "search", data=tasks, model=tiny_bert, methods="task_arithmetic,tsv",
                            lambdas="0.5,1.0", min_samples=4)
    rep = result.report["search"]
    assert rep["fidelities"] == [4, 12] and len(rep["trials"]) > 4
    assert sum(t["rung"] == 0 for t in rep["trials"]) == 4          # 2 methods × 2 λ, all scored first
    assert rep["best"]["score"] == max(t["score"] for t in rep["trials"] if t["rung"] == 1)
    out = result.save(tmp_path / "searched")
    recipe = load_recipe(out / RECIPE_NAME)
    assert recipe["method"] == rep["best"]["method"] and recipe["params"]["scale"] == rep["best"]["lambda"]
    assert [str(p) for p in recipe["adapters"]] == [str(d.resolve()) for d in bert_adapters]
    assert recipe["model"] == tiny_bert
    again = run_recipe(out / RECIPE_NAME, out=tmp_path / "again")
    for m in again.merged.modules:
        assert rel(again.delta(m).numpy(), result.delta(m).numpy()) < 1e-5


# ---------------------------------------------------------------- CLI and YAML


@pytest.fixture()
def merge_cli(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["merge"])
    return lambda *argv: cli.main(["merge", *map(str, argv)])


def test_cli_lists_and_runs_the_new_methods(merge_cli, capsys, bert_adapters, tiny_bert, tmp_path):
    assert merge_cli("--list-methods") == 0
    out = capsys.readouterr().out
    for name in ("continual", "do_merging", "doge", "fisher", "adamerging", "search"):
        assert f"\n{name} " in "\n" + out
    assert merge_cli("--method", "fisher", "--adapters", *bert_adapters, "--model", tiny_bert,
                     "--out", tmp_path / "x", "--quiet") == 2
    assert "needs task data" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert merge_cli("--method", "adamerging", "--adapters", *bert_adapters, "--model", tiny_bert, "--data",
                     "sentiment", "sms_spam", "--set", "steps=2", "--set", "samples=6", "--set", "granularity=task",
                     "--out", tmp_path / "ada", "--quiet") == 0
    report = json.loads((tmp_path / "ada" / "merge_report.json").read_text())
    assert report["adamerging"]["examples"] == {"t0": 6, "t1": 6}
    api = merge_adapters(bert_adapters, "adamerging", data=["sentiment", "sms_spam"], model=tiny_bert, steps=2,
                         samples=6, granularity="task")
    assert report["adamerging"]["coefficients"] == pytest.approx(api.report["adamerging"]["coefficients"])
    written, adapters = load_adapter(tmp_path / "ada"), [load_adapter(d) for d in bert_adapters]
    lam = report["adamerging"]["coefficients"]
    assert all(abs(v - 0.3) > 1e-3 for v in lam.values())             # two Adam steps moved λ off its init
    for m in adapters[0].modules:      # the written adapter is Σ_i λ_i ΔW_i with the reported λ
        ref = sum(lam[n] * a.delta(m) for n, a in zip(("t0", "t1"), adapters))
        assert rel(written.delta(m).numpy(), ref.numpy()) < 1e-5, m
        assert rel(written.delta(m).numpy(), api.delta(m).numpy()) < 1e-5, m
    assert merge_cli("--method", "continual", "--adapters", *bert_adapters, "--set", "order=sideways",
                     "--out", tmp_path / "y", "--quiet") == 2
    assert "order='sideways': Input should be 'shuffle' or 'given'" in capsys.readouterr().err


def test_yaml_recipe_with_data(bert_adapters, tiny_bert, tmp_path):
    from orthomerge.tasks import load_tasks

    (tmp_path / "t.csv").write_text("text,label\n" + "\n".join(f"{t},{i % 2}" for i, t in enumerate(TEXTS)) + "\n")
    (tmp_path / "u.csv").write_text("text,label\n" + "\n".join(f"{t},{(i // 3) % 2}" for i, t in enumerate(TEXTS))
                                    + "\n")
    (tmp_path / "tasks.yaml").write_text("- {name: one, train: t.csv, validation: t.csv, labels: ['0', '1']}\n"
                                         "- {name: two, train: u.csv, validation: u.csv, labels: ['0', '1']}\n")
    (tmp_path / "r.yaml").write_text(f"""
method: fisher
base_model: {tiny_bert}
adapters:
  - {{path: {bert_adapters[0]}, data: "tasks.yaml#one"}}
  - {{path: {bert_adapters[1]}, data: "tasks.yaml#two"}}
parameters: {{samples: 4, labels: gold, normalize_fisher: false}}
output: {{path: out}}
""")
    result = run_recipe(tmp_path / "r.yaml")
    assert result.report["fisher"]["labels"] == "gold" and (tmp_path / "out" / "merge_report.json").exists()
    # oracle: each adapter's gold Fisher on the first 4 train rows of its own task, by autograd; the
    # unnormalised Fisher formula; the written output is its best rank-Σr approximation
    tasks = {t.name: t for t in load_tasks([str(tmp_path / "tasks.yaml")])}
    adapters = [load_adapter(d) for d in bert_adapters]
    fishers = [brute_fisher(tiny_bert, a, tasks[n].train.take(4), "gold") for a, n in zip(adapters, ("one", "two"))]
    ref, norms = fisher_formula(adapters, [1.0, 1.0], fishers, normalize=False)
    assert [result.report["fisher"]["norms"][n] for n in result.names] == pytest.approx(norms, rel=1e-4)
    written = load_adapter(tmp_path / "out")
    for m in adapters[0].modules:
        u, s, vh = np.linalg.svd(ref[m].numpy())
        k = sum(a.rank(m) for a in adapters)
        assert rel(written.delta(m).numpy(), (u[:, :k] * s[:k]) @ vh[:k]) < 1e-4, m
    bad = tmp_path / "bad.yaml"
    bad.write_text((tmp_path / "r.yaml").read_text().replace('data: "tasks.yaml#two"', 'data: "tasks.yaml"')
                   .replace("path: out", "path: out_bad"))
    with pytest.raises(OrthomergeError, match="name one task"):
        run_recipe(bad)


# ---------------------------------------------------------------- the experiment runs them


def test_experiment_reports_the_new_methods(tiny_bert, tmp_path):
    from orthomerge.experiment import Experiment, ExperimentConfig
    from orthomerge.train import TrainConfig

    specs = []
    for name, word in (("aa", "great"), ("bb", "free")):
        rows = [(f"{t} {word if i % 2 else 'the'}", i % 2) for i, t in enumerate(TEXTS * 3)]
        (tmp_path / f"{name}.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
        specs.append(f"- {{name: {name}, train: {name}.csv, validation: {name}.csv, labels: ['0', '1']}}\n")
    (tmp_path / "tasks.yaml").write_text("".join(specs))
    new = ["continual", "do_merging", "doge", "fisher", "adamerging", "search"]
    config = ExperimentConfig(tasks=str(tmp_path / "tasks.yaml"), model=tiny_bert, inits=["lora"],
                              methods=["task_arithmetic", *new], lambdas=[0.5, 1.0], train_size=16, val_size=8,
                              test_size=8, stats_samples=8, train=TrainConfig(rank=2, epochs=1, lr=0.02))
    results = Experiment(config, tmp_path / "run", progress=False).run()
    run = results["runs"][0]
    merges = {m["method"]: m for m in run["merges"]}
    assert set(new) <= set(merges)
    # λ is learned (adamerging) or chosen (search) inside the method: no sweep; the others sweep [0.5, 1]
    assert merges["adamerging"]["val_curve"].keys() == {1.0} and merges["search"]["val_curve"].keys() == {1.0}
    for m in ("continual", "do_merging", "doge", "fisher"):
        assert merges[m]["val_curve"].keys() == {0.5, 1.0}, m
    for m in new:      # the reported numbers are what they say: best λ on validation, test / own adapter's test
        r = merges[m]
        assert r["lambda"] == max(r["val_curve"], key=lambda lam: (r["val_curve"][lam], -abs(lam - 1.0))), m
        single = run["single"]["test"]
        norm = {n: r["test"][n] / single[n] for n in r["test"] if single[n]}
        assert r["test_normalised"].keys() == r["test"].keys() and norm
        assert {n: r["test_normalised"][n] for n in norm} == pytest.approx(norm), m
        assert r["test_normalised_mean"] == pytest.approx(np.mean(list(norm.values()))), m
        assert r["test_mean"] == pytest.approx(np.mean(list(r["test"].values()))), m
