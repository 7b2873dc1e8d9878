"""OSRM init against independent numpy linear algebra and PEFT's own forward."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from conftest import TEXTS
from orthomerge.adapters import load_adapter, new_peft_model, from_peft_model, save_adapter
from orthomerge.cli import main as cli
from orthomerge.errors import OrthomergeError
from orthomerge.models import load_model, load_tokenizer
import scipy.linalg

from orthomerge.osrm import (SELECTIVE_EPSILON, init_peft_model_osrm, official_basis, osrm_bases, paper_basis,
                             post_convert, post_converted, selective_basis, shift_invert_smallest,
                             smallest_eigenvectors)
from orthomerge.stats import collect_stats, save_stats


def random_moment(n, rank, seed):
    x = np.random.default_rng(seed).normal(size=(rank, n))
    return x.T @ x / rank


def test_paper_basis_is_orthonormal_and_optimal():
    n, r = 40, 5
    S = random_moment(n, 200, 0)
    A = paper_basis(S, r)
    np.testing.assert_allclose(A @ A.T, np.eye(r), atol=1e-12)
    expected = np.sort(np.linalg.eigvalsh(S))[:r].sum()  # independent: numpy's full solver
    np.testing.assert_allclose(np.trace(A @ S @ A.T), expected, rtol=1e-10)
    assert np.all(A[np.arange(r), np.abs(A).argmax(1)] > 0)  # deterministic signs


def test_subset_solver_equals_full_solver():
    S = random_moment(64, 300, 1)
    va, a = smallest_eigenvectors(S, 6, solver="subset")
    vb, b = smallest_eigenvectors(S, 6, solver="full")
    np.testing.assert_allclose(va, vb, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a, b, atol=1e-8)


def _largest_angle_sine(rows, reference_rows):
    q, _ = np.linalg.qr(reference_rows.T)
    return np.linalg.norm(rows.T - q @ (q.T @ rows.T), 2)


def test_shift_invert_solver_gives_the_full_solves_subspace():
    """On a full-rank Wishart matrix (smallest eigenvalues crowded at the Marchenko–Pastur edge) the
    shift-invert solver certifies its answer and matches numpy's full eigh."""
    n, r = 300, 8
    S = random_moment(n, 2 * n, 11)
    assert shift_invert_smallest(S, r) is not None
    values, rows = smallest_eigenvectors(S, r, solver="shift-invert")
    full_values, full_vectors = np.linalg.eigh(S)
    np.testing.assert_allclose(values, full_values[:r], rtol=1e-10)
    assert _largest_angle_sine(rows, full_vectors[:, :r].T) < 1e-8
    np.testing.assert_allclose(rows, smallest_eigenvectors(S, r, solver="subset")[1], atol=1e-7)  # same signs
    np.testing.assert_allclose(rows @ rows.T, np.eye(r), atol=1e-10)


def test_shift_invert_declines_what_it_cannot_certify():
    n, r = 120, 6
    rng = np.random.default_rng(12)
    singular = random_moment(n, 40, 13)                       # rank 40: an 80-dimensional null space
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    repeated = q @ np.diag(np.r_[np.linspace(1, 2, r - 1), [3, 3], np.linspace(4, 9, n - r - 1)]) @ q.T
    indefinite = random_moment(n, 400, 14) - 0.5 * random_moment(n, 400, 15) * 3
    for matrix in (singular, repeated, indefinite):
        assert shift_invert_smallest(matrix, r) is None
        np.testing.assert_allclose(smallest_eigenvectors(matrix, r, solver="shift-invert")[0],
                                   smallest_eigenvectors(matrix, r, solver="subset")[0], atol=1e-10)
    with pytest.raises(OrthomergeError, match="unknown eigensolver"):
        smallest_eigenvectors(singular, r, solver="lobpcg")


def test_beta_breaks_null_space_ties_toward_own_task():
    n, r = 30, 3
    others = random_moment(n, 10, 2)           # rank 10: a 20-dimensional null space
    own = random_moment(n, 50, 3)
    A = paper_basis(others, r, own, beta=1e-8)
    assert np.trace(A @ others @ A.T) < 1e-9   # still optimal for the paper's objective
    w, V = np.linalg.eigh(others)
    null = V[:, w < 1e-10]
    P = null @ null.T
    _, U = np.linalg.eigh(P @ own @ P)
    top = U[:, -r:]                            # leading eigenvectors of P S_t P: the predicted limit
    cosines = np.linalg.svd(A @ top, compute_uv=False)
    assert cosines.min() > 1 - 1e-6


def test_official_basis_is_orthogonal_to_other_means():
    means = np.random.default_rng(4).normal(size=(5, 32))
    A = official_basis(means, 8)
    np.testing.assert_allclose(A @ A.T, np.eye(8), atol=1e-12)
    assert np.abs(A @ means.T).max() < 1e-12


def _quotient(A, own, other):
    """Generalised Rayleigh quotients aᵀ S_t a / aᵀ B a of the rows of A (scale-free)."""
    return np.einsum("ij,jk,ik->i", A, own, A) / np.einsum("ij,jk,ik->i", A, other, A)


def test_selective_basis_equals_scipy_generalised_eigh_with_unit_rows():
    n, r = 40, 5
    own, other = random_moment(n, 200, 5), random_moment(n, 300, 6)
    A = selective_basis(own, other, r)
    B = other + SELECTIVE_EPSILON * np.trace(other) / n * np.eye(n)
    values, vectors = scipy.linalg.eigh(own, B)            # the oracle: scipy's full generalised solve
    top = vectors[:, ::-1][:, :r]
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), 1, atol=1e-12)          # unit rows
    cosines = np.abs(np.sum(A * (top / np.linalg.norm(top, axis=0)).T, axis=1))   # row i ∥ eigenvector i
    np.testing.assert_allclose(cosines, 1, atol=1e-10)
    np.testing.assert_allclose(_quotient(A, own, B), values[::-1][:r], rtol=1e-10)   # descending quotients
    np.testing.assert_allclose(A @ B @ A.T, np.diag(np.diag(A @ B @ A.T)), atol=1e-10)   # B-orthogonal rows
    assert np.all(A[np.arange(r), np.abs(A).argmax(1)] > 0)   # deterministic signs


def test_selective_rows_maximise_the_rayleigh_quotient():
    """No direction has a higher own/other energy ratio than the first row, and the r-dimensional row space
    carries the largest generalised trace tr((A B Aᵀ)⁻¹ A S_t Aᵀ) of all r-dimensional subspaces."""
    n, r = 30, 4
    own, other = random_moment(n, 100, 7), random_moment(n, 20, 8)   # S_¬t of rank 20: the ridge matters
    A = selective_basis(own, other, r)
    B = other + SELECTIVE_EPSILON * np.trace(other) / n * np.eye(n)
    best = _quotient(A[:1], own, B)[0]
    trials = np.random.default_rng(9).normal(size=(2000, n))
    assert _quotient(trials, own, B).max() < best
    def trace_quotient(M):
        return np.trace(np.linalg.solve(M @ B @ M.T, M @ own @ M.T))
    ours = trace_quotient(A)
    for seed in range(50):
        M = A + 0.05 * np.random.default_rng(seed).normal(size=A.shape)   # nearby subspaces do worse
        assert trace_quotient(M) < ours
    assert ours == pytest.approx(np.sort(scipy.linalg.eigvalsh(own, B))[-r:].sum(), rel=1e-10)


def test_selective_variant_needs_own_statistics_and_uses_them(task_stats):
    modules = task_stats[0].modules
    with pytest.raises(OrthomergeError, match="own statistics"):
        osrm_bases(modules, task_stats[1:], 4, variant="selective")
    bases = osrm_bases(modules, task_stats[1:], 4, variant="selective", own=task_stats[0])
    m = modules[0]
    want = selective_basis(task_stats[0].second_moment(m).numpy(),
                           (task_stats[1].second_moment(m) + task_stats[2].second_moment(m)).numpy() / 2, 4)
    np.testing.assert_allclose(bases[m], want, atol=1e-10)


def test_rank_larger_than_width_is_an_error():
    with pytest.raises(OrthomergeError, match="rank 50"):
        paper_basis(np.eye(10), 50)


@pytest.fixture(scope="module")
def task_stats(tiny_bert):
    model, tok = load_model(tiny_bert), load_tokenizer(tiny_bert)
    return [collect_stats(model, tok, TEXTS[i::3], ["query", "value"], progress=False) for i in range(3)]


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_init_adapter_matches_base_logits_in_plain_peft(tiny_bert, task_stats, tmp_path, variant):
    from peft import PeftModel

    model = load_model(tiny_bert, num_labels=3, seed=5)
    peft_model = new_peft_model(model, ["query", "value"], rank=4, alpha=8)
    init_peft_model_osrm(peft_model, task_stats[1:], variant=variant)
    save_adapter(from_peft_model(peft_model), tmp_path / "init")
    adapter = load_adapter(tmp_path / "init")
    for module in adapter.modules:
        A = adapter.A[module].double().numpy()
        np.testing.assert_allclose(A @ A.T, np.eye(4), atol=1e-6)
        assert torch.count_nonzero(adapter.B[module]) == 0
        if variant == "paper":
            S = sum(s.second_moment(module) for s in task_stats[1:]).numpy() / 2
            smallest = np.sort(np.linalg.eigvalsh(S))[:4].sum()
            np.testing.assert_allclose(np.trace(A @ S @ A.T), smallest, rtol=1e-4, atol=1e-6)
    batch = load_tokenizer(tiny_bert)(TEXTS, padding=True, return_tensors="pt")
    base = load_model(tiny_bert, num_labels=3, seed=5)
    loaded = PeftModel.from_pretrained(load_model(tiny_bert, num_labels=3, seed=99), tmp_path / "init").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, base(**batch).logits, rtol=0, atol=1e-6)


def test_cli_init_and_errors(tiny_bert, tiny_llama, task_stats, tmp_path, capsys):
    paths = []
    for i, stats in enumerate(task_stats):
        paths.append(str(tmp_path / f"s{i}.safetensors"))
        save_stats(stats, paths[-1])
    out = tmp_path / "adapter"
    assert cli(["init", "--model", tiny_bert, "--other-stats", *paths[1:], "--own-stats", paths[0], "--beta",
                "1e-6", "--rank", "4", "--num-labels", "3", "--out", str(out), "--quiet"]) == 0
    meta = load_adapter(out).metadata
    assert meta["init"] == "osrm" and meta["beta"] == 1e-6
    # statistics of another model, missing targets, rank too large: one-line errors, no output
    for args, message in [
        (["--model", tiny_llama, "--targets", "q_proj"], "not on this base model|no statistics"),
        (["--model", tiny_bert, "--targets", "key"], "no statistics for module"),
        (["--model", tiny_bert, "--rank", "64"], "rank 64"),
        (["--model", tiny_bert, "--beta", "0.1"], r"--beta 0.1 needs .*--own-stats"),   # the CLI names its flags
    ]:
        bad = tmp_path / "bad"
        assert cli(["init", *args, "--other-stats", *paths[1:], "--out", str(bad), "--quiet"]) == 2
        assert re.search(message, capsys.readouterr().err)
        assert not bad.exists()


def test_cli_returns_2_and_one_line_on_user_error(tmp_path, capsys):
    assert cli(["post", "--adapter", str(tmp_path / "missing"), "--other-stats", "x", "--out",
                str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing" in err


def test_post_conversion_is_the_projection(tiny_bert, task_stats):
    model = load_model(tiny_bert, num_labels=2)
    peft_model = new_peft_model(model, ["query", "value"], rank=4, alpha=8)
    torch.manual_seed(3)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    adapter = from_peft_model(peft_model)
    new, report = post_convert(adapter, task_stats[1:])
    total, kept = 0.0, 0.0
    for m in adapter.modules:
        A2 = new.A[m].double()
        P = A2.T @ A2
        dense = adapter.delta(m).double()
        torch.testing.assert_close(new.delta(m).double(), dense @ P, rtol=1e-5, atol=1e-6)
        total += dense.norm() ** 2
        kept += (dense @ P).norm() ** 2
    assert report["retained_energy"] == pytest.approx(float(kept / total), rel=1e-5)
    assert 0 < report["retained_fraction"] < 1


def _trained_like(tiny_bert, seed):
    """A LoRA adapter with non-zero B (as after training) and a distinct head per seed."""
    peft_model = new_peft_model(load_model(tiny_bert, num_labels=2, seed=seed), ["query", "value"], rank=4, alpha=8)
    torch.manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    return from_peft_model(peft_model)


def test_selective_post_conversion_is_the_projection(tiny_bert, task_stats):
    """With non-orthonormal rows, B' is still the least-squares fit: s B' A' = ΔW P, P the projector."""
    adapter = _trained_like(tiny_bert, 4)
    new, _ = post_convert(adapter, task_stats[1:], "selective", task_stats[0])
    for m in adapter.modules:
        A2 = new.A[m].double()
        P = A2.T @ torch.linalg.solve(A2 @ A2.T, A2)
        torch.testing.assert_close(new.delta(m).double(), adapter.delta(m).double() @ P, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["paper", "selective"])
def test_post_converted_uses_each_adapters_other_tasks(tiny_bert, task_stats, variant):
    adapters = [_trained_like(tiny_bert, seed) for seed in range(3)]
    converted = post_converted(adapters, task_stats, variant)
    for i, (old, new) in enumerate(zip(adapters, converted)):
        others = [s for j, s in enumerate(task_stats) if j != i]
        want, report = post_convert(old, others, variant, task_stats[i])
        for m in old.modules:
            torch.testing.assert_close(new.A[m], want.A[m])
            torch.testing.assert_close(new.B[m], want.B[m])
        assert new.metadata["post_report"] == report
        for key in old.heads:
            torch.testing.assert_close(new.heads[key], old.heads[key])   # the trained head is carried
    assert not torch.allclose(converted[0].A[adapters[0].modules[0]], converted[1].A[adapters[0].modules[0]])
    with pytest.raises(OrthomergeError, match="one statistics per adapter"):
        post_converted(adapters, task_stats[:2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_selective_solve_gives_the_lapack_basis():
    own, other = random_moment(64, 500, 3), random_moment(64, 300, 4)
    np.testing.assert_allclose(selective_basis(own, other, 6, device="cuda"), selective_basis(own, other, 6),
                               atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_eigensolver_gives_the_lapack_basis():
    S = random_moment(64, 500, 3)
    want = smallest_eigenvectors(S, 6)
    got = smallest_eigenvectors(S, 6, device="cuda")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got[1], want[1], atol=1e-8)   # the same sign convention on both paths
