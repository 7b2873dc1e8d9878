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
from orthomerge.osrm import init_peft_model_osrm, official_basis, paper_basis, post_convert, smallest_eigenvectors
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
    va, a = smallest_eigenvectors(S, 6, subset=True)
    vb, b = smallest_eigenvectors(S, 6, subset=False)
    np.testing.assert_allclose(va, vb, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a, b, atol=1e-8)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_eigensolver_gives_the_lapack_basis():
    S = random_moment(64, 500, 3)
    want = smallest_eigenvectors(S, 6)
    got = smallest_eigenvectors(S, 6, device="cuda")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got[1], want[1], atol=1e-8)   # the same sign convention on both paths
