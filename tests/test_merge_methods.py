"""Pure merge rules: properties for every registered method, and dense references written from the papers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from merge_fixtures import deltas, permuted, random_task, rel, update

from orthomerge.errors import OrthomergeError
from orthomerge.merge import METHODS, get_method, list_methods
from orthomerge.merge.elementwise import abs_histogram_threshold, trim_threshold
from orthomerge.merge.recompress import factored_svd, recompress_dense, recompress_factors, residual_sq
from orthomerge.merge.registry import ModuleUpdates, PerTask

TOL = 1e-5


def with_grams(task: ModuleUpdates, seed: int = 7) -> ModuleUpdates:
    g = torch.Generator().manual_seed(seed)
    n = task.shape[1]
    task.grams, task.tokens = [], []
    for i in range(len(task)):
        x = torch.randn(30 + 5 * i, n, generator=g, dtype=torch.float64) * (1 + i)
        task.grams.append(x.T @ x)
        task.tokens.append(x.shape[0])
    return task


def run(name: str, task: ModuleUpdates, **params):
    spec = get_method(name)
    return spec.fn(task, **spec.resolve(params))


def outputs(result) -> list[np.ndarray]:
    if isinstance(result, PerTask):
        return [update(u) * (nu / de) for u, nu, de in zip(result.updates, *result.info)]
    return [update(result)]


# ---------------------------------------------------------------- properties of every method

ISOTROPIC = {"iso_c", "iso_cts"}


def identity_params(name: str) -> dict:
    return {"density": 1.0} if "density" in METHODS[name].defaults else {}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_identity(name):
    """One adapter, weight 1 (density 1 / p = 0 for element-wise rules) gives back its ΔW.

    Iso-C/CTS flatten the spectrum, so their identity holds for an already isotropic adapter only."""
    task = with_grams(random_task(ranks=(3,), seed=11))
    if name in ISOTROPIC:
        q1, _ = torch.linalg.qr(torch.randn(24, 3, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(20, 3, dtype=torch.float64))
        task.factors = [((2.5 * q1).float(), q2.T.float())]
    out = outputs(run(name, task, **identity_params(name)))
    for o in out:
        assert rel(o, deltas(task)[0]) < TOL, name


def property_params(name: str) -> dict:
    return {"density": 0.5} if "density" in METHODS[name].defaults else {}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_permutation_invariance(name):
    weights = (0.7, 1.3, 0.4) if name == "regmean" else (0.7, 1.3, -0.4)
    task = with_grams(random_task(ranks=(3, 2, 4), weights=weights, seed=5))
    order = [2, 0, 1]
    a = outputs(run(name, task, **property_params(name)))
    b = outputs(run(name, permuted(task, order), **property_params(name)))
    if len(a) > 1:   # per-task outputs follow the tasks
        b = [b[order.index(i)] for i in range(len(order))]
    for x, y in zip(a, b):
        assert rel(y, x) < TOL, name


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.random))
def test_seeds_reproducible(name):
    task = random_task(seed=3)
    a = update(run(name, task, density=0.5))
    b = update(run(name, random_task(seed=3), density=0.5))
    assert np.array_equal(a, b)
    other = random_task(seed=3)
    other.seeds = [s + 1 for s in other.seeds]
    assert not np.allclose(update(run(name, other, density=0.5)), a)


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.linear))
def test_linear_methods_are_linear(name):
    task = random_task(ranks=(3, 2, 4), weights=(0.5, -1.5, 2.0), seed=9)
    got = update(run(name, task, scale=0.7))
    ref = 0.7 * sum(w * d for w, d in zip(task.weights, deltas(task)))
    assert rel(got, ref) < TOL


# ---------------------------------------------------------------- dense references (paper definitions)


def ref_trim(d: np.ndarray, density: float) -> np.ndarray:
    k = int(density * d.size)
    if k >= d.size:
        return d.copy()
    thresh = np.sort(np.abs(d).ravel())[::-1][k - 1]
    return np.where(np.abs(d) >= thresh, d, 0.0)


def ref_ties(ds, w, density, scale=1.0, sign="total", normalize="count"):
    tw = np.stack([wi * ref_trim(d, density) for d, wi in zip(ds, w)])
    votes = tw.sum(0) if sign == "total" else np.sign(tw).sum(0)
    gamma = np.where(votes >= 0, 1.0, -1.0)
    agree = np.sign(tw) == gamma
    num = (tw * agree).sum(0)
    den = agree.sum(0) if normalize == "count" else (agree * np.abs(np.asarray(w))[:, None, None]).sum(0)
    return scale * num / np.where(den > 0, den, 1.0)


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("normalize", ["count", "weight"])
def test_ties_matches_reference(sign, normalize):
    task = random_task(ranks=(3, 2, 4), weights=(1.0, 0.6, 1.4), seed=2)
    got = update(run("ties", task, density=0.3, scale=0.8, sign=sign, normalize=normalize))
    assert rel(got, ref_ties(deltas(task), task.weights, 0.3, 0.8, sign, normalize)) < TOL


@pytest.mark.parametrize("select", ["partition", "kthvalue", "sort"])
def test_trim_selection_algorithms_agree(select):
    x = torch.randn(50, 40)
    t = trim_threshold(x.clone(), 0.2, select)
    assert t == pytest.approx(np.sort(np.abs(x.numpy()).ravel())[::-1][int(0.2 * 2000) - 1])


def test_model_scope_threshold_is_exact():
    chunks = [torch.randn(30, 20), torch.randn(7, 50) * 3, torch.zeros(5, 5)]
    allv = np.concatenate([c.abs().numpy().ravel() for c in chunks])
    for density in (0.0, 0.05, 0.2, 0.77, 1.0):
        t = abs_histogram_threshold(lambda: iter(chunks), density, bins=64)
        k = int(density * allv.size)
        expect = float("inf") if k == 0 else (0.0 if k >= allv.size else np.sort(allv)[::-1][k - 1])
        assert t == pytest.approx(expect)


def test_magnitude_prune_matches_reference():
    task = random_task(weights=(1.0, -0.5, 2.0), seed=4)
    got = update(run("magnitude_prune", task, density=0.25, scale=1.5))
    ref = 1.5 * sum(w * ref_trim(d, 0.25) for w, d in zip(task.weights, deltas(task)))
    assert rel(got, ref) < TOL


def test_dare_linear_drops_and_rescales():
    """Kept entries are τ/density, the kept fraction ≈ density, the mean over seeds ≈ task arithmetic."""
    task = random_task(m=60, n=50, ranks=(3,), seed=6)
    d = deltas(task)[0]
    got = update(run("dare_linear", task, density=0.3))
    kept = got != 0
    assert abs(kept.mean() - 0.3) < 0.03
    assert np.allclose(got[kept], d[kept] / 0.3, rtol=1e-5)
    assert np.allclose(update(run("dare_linear", task, density=0.3, rescale=False))[kept], d[kept], rtol=1e-5)
    runs = []
    for s in range(100):
        t = random_task(m=60, n=50, ranks=(3,), seed=6)
        t.seeds = [s]
        runs.append(update(run("dare_linear", t, density=0.5)))
    assert rel(np.mean(runs, axis=0), d) < 0.2      # unbiased: E[m ⊙ τ / density] = τ


def test_dare_ties_is_ties_election_on_dropped_tasks():
    task = random_task(seed=8)
    got = update(run("dare_ties", task, density=0.6))
    dropped = [update(run("dare_linear", ModuleUpdates(task.name, [f], [1.0], [s]), density=0.6))
               for f, s in zip(task.factors, task.seeds)]
    assert rel(got, ref_ties(dropped, task.weights, 1.0)) < TOL


def ref_svd(x: np.ndarray):
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    rho = int((s > max(x.shape) * np.finfo(np.float32).eps * s[0]).sum())
    return u[:, :rho], s[:rho], vh[:rho]


def ref_polar(x):
    u, _, vh = np.linalg.svd(x, full_matrices=False)
    return u @ vh


def test_tsv_matches_reference():
    task = random_task(ranks=(3, 2, 4), weights=(1.0, 0.5, -1.0), seed=12)
    us, ss, vs = zip(*[ref_svd(w * d) for w, d in zip(task.weights, deltas(task))])
    u, s, v = np.concatenate(us, 1), np.concatenate(ss), np.concatenate([x.T for x in vs], 1)
    ref = 1.3 * ref_polar(u) @ np.diag(s) @ ref_polar(v).T
    assert rel(update(run("tsv", task, scale=1.3)), ref) < TOL


def test_iso_c_matches_reference_and_uses_numerical_rank():
    task = random_task(ranks=(3, 2), weights=(1.0, 2.0), seed=13)
    task.factors.append(task.factors[0])            # a repeated adapter: rank of the sum stays 5
    task.weights.append(1.0)
    total = sum(w * d for w, d in zip(task.weights, deltas(task)))
    u, s, vh = ref_svd(total)
    assert len(s) == 5
    got = update(run("iso_c", task, scale=1.5))
    assert rel(got, 1.5 * s.mean() * u @ vh) < TOL
    assert np.linalg.matrix_rank(got) == 5


def test_iso_cts_matches_reference():
    task = random_task(m=30, n=28, ranks=(4, 4, 4), seed=14)
    ds = deltas(task)
    u, s, vh = ref_svd(sum(ds))
    rho, t = len(s), len(ds)
    k = int(rho * 0.8)
    spec_total = round((rho - k) / t) * t
    k = rho - spec_total
    per = spec_total // t
    U, S, V = [u[:, :k]], [s[:k]], [vh[:k]]
    for d in ds:
        ui, si, vi = ref_svd(d - u[:, :k] @ (u[:, :k].T @ d))
        U.append(ui[:, :per]), S.append(si[:per]), V.append(vi[:per])
    Sall = np.concatenate(S)
    ref = Sall.mean() * ref_polar(np.concatenate(U, 1)) @ ref_polar(np.concatenate(V, 0).T).T
    assert rel(update(run("iso_cts", task)), ref) < TOL


@pytest.mark.parametrize("gram", ["sum", "mean"])
def test_regmean_matches_dense_definition(gram):
    task = with_grams(random_task(seed=15, weights=(1.0, 2.0, 0.5)))
    w0 = np.random.default_rng(0).normal(size=task.shape)
    alpha = 0.9
    gt = []
    for g, tok, w in zip(task.grams, task.tokens, task.weights):
        g = g.numpy()
        g = alpha * g + (1 - alpha) * np.diag(np.diag(g))
        gt.append(w * (g / tok if gram == "mean" else g))
    ws = [w0 + d for d in deltas(task)]
    merged = sum(wi @ g for wi, g in zip(ws, gt)) @ np.linalg.inv(sum(gt))
    got = update(run("regmean", task, alpha=alpha, gram=gram))
    assert rel(got, merged - w0) < TOL


def test_regmean_needs_grams():
    with pytest.raises(OrthomergeError):
        run("regmean", random_task())


def test_emr_matches_reference():
    task = random_task(weights=(1.0, 0.5, 1.5), seed=16)
    taus = np.stack([w * d for w, d in zip(task.weights, deltas(task))])
    gamma = np.where(taus.sum(0) >= 0, 1.0, -1.0)
    uni = gamma * np.max(np.abs(taus) * (np.sign(taus) == gamma), axis=0)
    res = run("emr", task)
    for i, got in enumerate(outputs(res)):
        mask = taus[i] * uni > 0
        lam = np.abs(taus[i]).sum() / np.abs(mask * uni).sum()
        assert rel(got, lam * mask * uni) < TOL


# ---------------------------------------------------------------- Core-Space and KnOTS


@pytest.mark.parametrize("space", ["core", "knots"])
def test_subspace_linear_equals_full_space(space):
    task = random_task(ranks=(3, 2, 4), weights=(0.3, -1.1, 0.9), seed=17)
    full = update(run("task_arithmetic", task, scale=0.6))
    assert rel(update(run(f"{space}_task_arithmetic", task, scale=0.6)), full) < TOL


def test_core_tsv_equals_tsv_for_equal_ranks():
    task = random_task(ranks=(3, 3, 3), weights=(1.0, 0.5, 2.0), seed=18)
    assert rel(update(run("core_tsv", task)), update(run("tsv", task))) < TOL


def sign_fixed(u, vh=None):
    idx = np.abs(u).argmax(0)
    s = np.sign(u[idx, np.arange(u.shape[1])])
    return (u * s, vh * s[:, None]) if vh is not None else u * s


def test_core_ties_matches_reference():
    task = random_task(ranks=(3, 2, 4), seed=19)
    bs = np.concatenate([b.double().numpy() for b, _ in task.factors], 1)
    as_ = np.concatenate([a.double().numpy() for _, a in task.factors], 0)
    ub = sign_fixed(ref_svd(bs)[0])
    va = sign_fixed(ref_svd(as_.T)[0])
    cores = [ub.T @ d @ va for d in deltas(task)]
    ref = ub @ ref_ties(cores, task.weights, 0.2) @ va.T
    assert rel(update(run("core_ties", task, density=0.2)), ref) < TOL


def test_knots_ties_matches_reference():
    task = random_task(ranks=(3, 2, 4), seed=20)
    ds = deltas(task)
    n = task.shape[1]
    u, s, vh = ref_svd(np.concatenate(ds, 1))
    u, vh = sign_fixed(u, vh)
    vs = [vh[:, i * n:(i + 1) * n] for i in range(len(ds))]
    assert rel(u @ np.diag(s) @ vs[1], ds[1]) < 1e-8
    ref = u @ np.diag(s) @ ref_ties(vs, task.weights, 0.2)
    assert rel(update(run("knots_ties", task, density=0.2)), ref) < TOL


def test_subspace_rules_differ_from_dense_rules():
    task = random_task(seed=21)
    dense = update(run("ties", task))
    assert rel(update(run("core_ties", task)), dense) > 1e-3
    assert rel(update(run("knots_ties", task)), dense) > 1e-3


# ---------------------------------------------------------------- building blocks


def test_factored_svd_and_exact_recompression():
    task = random_task(m=40, n=30, ranks=(3, 4), seed=22)
    B = torch.cat([b for b, _ in task.factors], 1)
    A = torch.cat([a for _, a in task.factors], 0)
    d = (B.double() @ A.double()).numpy()
    u, s, vh = factored_svd(B, A)
    assert np.allclose(s.numpy(), np.linalg.svd(d, compute_uv=False)[:7], rtol=1e-6)
    b2, a2, loss = recompress_factors(B, A, 4)
    sv = np.linalg.svd(d, compute_uv=False)
    assert a2.shape[0] == 4
    assert loss.rel_error == pytest.approx(np.sqrt((sv[4:] ** 2).sum() / (sv ** 2).sum()), rel=1e-6)
    assert rel((b2.double() @ a2.double()).numpy(), d) == pytest.approx(loss.rel_error, rel=1e-4)


@pytest.mark.parametrize("how", ["exact", "randomized"])
def test_dense_recompression_reports_exact_error(how):
    d = torch.randn(50, 40)
    b, a, loss = recompress_dense(d, 10, how)
    assert rel((b.double() @ a.double()).numpy(), d.double().numpy()) == pytest.approx(loss.rel_error, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_elements", [1, 37, 1 << 18])
def test_residual_is_blockwise_exact_and_leaves_its_input(dtype, block_elements):
    """The re-compression error against numpy in float64, whatever the row blocks; ``d`` is not modified."""
    g = torch.Generator().manual_seed(3)
    d, B, A = (torch.randn(*shape, generator=g, dtype=dtype) for shape in ((23, 17), (23, 4), (4, 17)))
    before = d.clone()
    err, total = residual_sq(d, B, A, block_elements)
    dn, bn, an = (x.double().numpy() for x in (d, B, A))
    assert err == pytest.approx(((dn - bn @ an) ** 2).sum(), rel=1e-12)
    assert total == pytest.approx((dn ** 2).sum(), rel=1e-12)
    assert torch.equal(d, before)


def test_unknown_method_and_parameter():
    with pytest.raises(OrthomergeError, match="unknown merge method"):
        get_method("nope")
    with pytest.raises(OrthomergeError, match="unknown parameter"):
        get_method("ties").resolve({"densty": 0.2})
    with pytest.raises(OrthomergeError, match="no factored-space variant"):
        get_method("ties", "factored")
    assert get_method("ties", "core").name == "core_ties"
    assert get_method("ties", "knots").name == "knots_ties"


# ---------------------------------------------------------------- typed hyper-parameters (one source of truth)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_parameters_are_the_rule_signature(name):
    """Defaults come from the function signature, nowhere else; --list-methods shows every one."""
    import inspect

    spec = METHODS[name]
    sig = inspect.signature(spec.fn)
    assert spec.defaults == {k: p.default for k, p in list(sig.parameters.items())[1:]}
    assert spec.resolve({}) == spec.defaults
    lines = list_methods()
    at = next(i for i, line in enumerate(lines) if line.split()[0] == name)
    for key, default in spec.defaults.items():
        assert f"{key}={default!r}" in lines[at + 1]


@pytest.mark.parametrize("method, params, needle", [
    ("ties", {"sign": "most"}, "sign='most'"),
    ("ties", {"density": 0.0}, "density=0.0"),
    ("ties", {"density": 1.5}, "density=1.5"),
    ("ties", {"scale": float("nan")}, "scale=nan"),
    ("ties", {"scale": "1"}, "scale='1'"),
    ("fisher", {"normalize_fisher": 1}, "normalize_fisher=1"),
    ("do_merging", {"steps": True}, "steps=True"),
    ("do_merging", {"steps": 2.5}, "steps=2.5"),
    ("regmean", {"alpha": 1.2}, "alpha=1.2"),
    ("emr", {"rescale_scope": "layer"}, "rescale_scope='layer'"),
    ("core_ties", {"trim_scope": "model"}, "unknown parameter 'trim_scope'"),
])
def test_bad_parameters_are_one_line_errors(method, params, needle):
    with pytest.raises(OrthomergeError) as err:
        get_method(method).resolve(params)
    message = str(err.value)
    assert needle in message and method in message and "\n" not in message


def test_valid_parameters_pass_unchanged():
    spec = get_method("ties")
    assert spec.resolve({"density": [0.2, 0.5], "scale": 2})["density"] == [0.2, 0.5]
    assert spec.resolve({"scale": 2})["scale"] == 2          # ints are numbers; values are not rewritten
    assert get_method("search").resolve({"methods": ["ties", "tsv"], "lambdas": 0.5})["lambdas"] == 0.5


def test_register_refuses_an_untyped_parameter():
    from orthomerge.merge.registry import register

    with pytest.raises(ValueError, match="needs a type annotation and a default"):
        @register("untyped_test_method", space="factored", family="test", summary="x")
        def untyped(updates, scale=1.0):
            return None
    assert "untyped_test_method" not in METHODS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if not (m.needs_data or m.needs_stats)))
def test_rules_on_cuda_equal_the_cpu(name):
    """Every data-free rule runs on the device of its inputs and gives the CPU's result (float tolerance)."""
    import dataclasses

    task = random_task()
    on_gpu = dataclasses.replace(task, factors=[(b.cuda(), a.cuda()) for b, a in task.factors])
    for want, got in zip(outputs(run(name, task, **property_params(name))),
                         outputs(run(name, on_gpu, **property_params(name)))):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if m.batch_fn is not None))
def test_batched_rule_equals_one_module_at_a_time(name):
    """The engine merges modules of one shape in one call of a batched rule: the same updates as the rule
    applied to each module alone, also for a module whose update is rank-deficient (its numerical rank
    differs from the others') and for a module of another shape (its own group)."""
    from orthomerge.adapters import LoraAdapter
    from orthomerge.merge import merge_adapters

    g = torch.Generator().manual_seed(3)
    shapes = {"a": (24, 20), "b": (24, 20), "c": (24, 20), "d": (16, 28)}
    adapters = []
    for t in range(3):
        A = {m: torch.randn(4, n, generator=g) for m, (_, n) in shapes.items()}
        B = {m: torch.randn(o, 4, generator=g) for m, (o, _) in shapes.items()}
        B["c"] = B["c"] * torch.tensor([1.0, 1.0, 0.0, 0.0])   # rank 2 in every task
        adapters.append(LoraAdapter(A=A, B=B, scaling={m: 0.5 for m in shapes}))
    merged = merge_adapters(adapters, name, scale=0.8)
    for m in shapes:
        alone = run(name, ModuleUpdates(m, [a.scaled_factors(m) for a in adapters], [1.0] * 3), scale=0.8)
        np.testing.assert_allclose(merged.merged.delta(m).numpy(), update(alone), rtol=1e-5, atol=1e-6)
    # spectral rules keep the numerical rank only (2 per task); task arithmetic concatenates the factors
    assert merged.merged.rank("c") == (12 if name == "task_arithmetic" else 6)


@pytest.mark.parametrize("flag", [{"random": True}, {"needs_stats": True}, {"per_task": True},
                                  {"prepare": lambda ctx: None}])
def test_a_batched_rule_cannot_ask_for_what_the_batch_does_not_carry(flag):
    from orthomerge.merge.registry import METHODS, register

    with pytest.raises(ValueError, match="batched rule"):
        register("never_registered", space="factored", family="test", summary="", batched=True, **flag)
    assert "never_registered" not in METHODS
