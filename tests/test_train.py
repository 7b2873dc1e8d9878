"""Training: a tiny task trains above chance; inits and constraints behave as stated."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from orthomerge.errors import OrthomergeError
from orthomerge.models import load_model, load_tokenizer
from orthomerge.stats import collect_stats
from orthomerge.tasks import Split, Task
from orthomerge.train import TrainConfig, interference_penalty, train_adapter

POS = ["great fun movie", "love the music", "good show", "fun game", "great star", "love the film"]
NEG = ["awful boring plot", "bad actor", "hate the movie", "boring show", "awful film", "bad game"]


def toy_task(name="toy", repeat=6):
    texts = (POS + NEG) * repeat
    labels = ([1] * len(POS) + [0] * len(NEG)) * repeat
    split = Split(texts, labels)
    return Task(name, ["negative", "positive"], "accuracy", split, Split(POS + NEG, [1] * 6 + [0] * 6),
                Split(POS + NEG, [1] * 6 + [0] * 6))


@pytest.fixture(scope="module")
def other_stats(tiny_bert):
    model, tok = load_model(tiny_bert), load_tokenizer(tiny_bert)
    return [collect_stats(model, tok, ["what city is the star from", "who is the actor", "how many year"] * 3,
                          ["query", "value"], progress=False),
            collect_stats(model, tok, ["win a free prize call now", "reply stop to text"] * 3,
                          ["query", "value"], progress=False)]


def test_tiny_task_trains_above_chance(tiny_bert):
    adapter = train_adapter(tiny_bert, toy_task(), TrainConfig(rank=4, epochs=6, lr=2e-2, batch_size=8),
                            progress=False)
    assert adapter.metadata["history"][-1]["val_accuracy"] >= 0.75  # chance is 0.5


@pytest.mark.parametrize("init", ["osrm", "orthogonal", "lora-unit"])
def test_scale_matched_inits_have_unit_orthonormal_rows(tiny_bert, other_stats, init):
    config = TrainConfig(init=init, rank=4, epochs=1, lr=1e-9, batch_size=8)
    adapter = train_adapter(tiny_bert, toy_task(repeat=1), config, others=other_stats, progress=False)
    for m, A in adapter.initial_A.items():
        norms = A.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=1e-5)
        if init != "lora-unit":
            torch.testing.assert_close(A @ A.T, torch.eye(4), rtol=0, atol=1e-5)


def test_same_seed_same_head_and_order(tiny_bert, other_stats):
    a = train_adapter(tiny_bert, toy_task(), TrainConfig(init="lora", rank=4, epochs=1), progress=False)
    b = train_adapter(tiny_bert, toy_task(), TrainConfig(init="lora", rank=4, epochs=1), progress=False)
    for m in a.modules:
        torch.testing.assert_close(a.delta(m), b.delta(m))


def test_frozen_A_does_not_change(tiny_bert, other_stats):
    adapter = train_adapter(tiny_bert, toy_task(), TrainConfig(init="osrm", rank=4, epochs=1, freeze="A"),
                            others=other_stats, progress=False)
    for m in adapter.modules:
        assert torch.equal(adapter.A[m], adapter.initial_A[m])
        assert adapter.B[m].abs().sum() > 0


def test_projected_training_stays_in_subspace(tiny_bert, other_stats):
    from orthomerge.osrm import other_second_moment, smallest_eigenvectors

    k = 8
    adapter = train_adapter(tiny_bert, toy_task(), TrainConfig(init="osrm", rank=4, epochs=1, subspace_k=k,
                                                               lr=5e-3), others=other_stats, progress=False)
    for m in adapter.modules:
        _, rows = smallest_eigenvectors(other_second_moment(other_stats, m), k)
        U = torch.from_numpy(rows.T)
        A = adapter.A[m].double()
        assert (A - A @ U @ U.T).abs().max() < 1e-6
        assert not torch.allclose(adapter.A[m], adapter.initial_A[m])  # it did move, within the subspace


def test_regulariser_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    X = torch.randn(20, 10, generator=g, dtype=torch.float64)
    S = X.T @ X / 20
    interference_penalty(A, S).backward()
    numeric = np.zeros((3, 10))
    eps = 1e-6
    for i in range(3):
        for j in range(10):
            d = torch.zeros_like(A)
            d[i, j] = eps
            numeric[i, j] = ((interference_penalty(A.detach() + d, S) - interference_penalty(A.detach() - d, S))
                             / (2 * eps)).item()
    np.testing.assert_allclose(A.grad.numpy(), numeric, rtol=1e-6, atol=1e-8)


def test_bad_config_and_missing_stats(tiny_bert):
    with pytest.raises(OrthomergeError, match="unknown init"):
        train_adapter(tiny_bert, toy_task(), TrainConfig(init="pissa"), progress=False)
    with pytest.raises(OrthomergeError, match="statistics"):
        train_adapter(tiny_bert, toy_task(), TrainConfig(init="osrm"), progress=False)
