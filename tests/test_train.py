"""Training: a tiny task trains above chance; inits and constraints behave as stated."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from orthomerge.errors import OrthomergeError
from orthomerge.models import load_model, load_tokenizer
from orthomerge.stats import collect_stats
from orthomerge.tasks import Split, Task
from orthomerge.train import (TrainConfig, initialised_model, interference_penalty, lora_A, lora_layers,
                              train_adapter)

POSITIVE, NEGATIVE = ["great", "love", "good", "fun"], ["awful", "bad", "hate", "boring"]
NOUNS = ["movie", "film", "show", "game", "music", "star", "plot", "actor"]


def toy_task(name="toy", repeat=2):
    """Rows "<sentiment word> <noun>"; each word's rows with two of the nouns are held out (validation and
    test), so validating measures what was learnt, not what was seen."""
    train, held = [], []
    for label, words in ((1, POSITIVE), (0, NEGATIVE)):
        for i, word in enumerate(words):
            for j, noun in enumerate(NOUNS):
                (held if j % len(words) == i else train).append((f"{word} {noun}", label))
    train_split = Split([t for t, _ in train] * repeat, [y for _, y in train] * repeat)
    held_split = Split([t for t, _ in held], [y for _, y in held])
    return Task(name, ["negative", "positive"], "accuracy", train_split, held_split, held_split)


@pytest.fixture(scope="module")
def other_stats(tiny_bert):
    model, tok = load_model(tiny_bert), load_tokenizer(tiny_bert)
    return [collect_stats(model, tok, ["what city is the star from", "who is the actor", "how many year"] * 3,
                          ["query", "value"], progress=False),
            collect_stats(model, tok, ["win a free prize call now", "reply stop to text"] * 3,
                          ["query", "value"], progress=False)]


def test_tiny_task_trains_above_chance_on_held_out_rows(tiny_bert):
    task = toy_task()
    assert not set(task.validation.texts) & set(task.train.texts)
    adapter = train_adapter(tiny_bert, task, TrainConfig(rank=4, epochs=6, lr=2e-2, batch_size=8), progress=False)
    assert adapter.metadata["history"][-1]["val_accuracy"] >= 0.75  # chance is 0.5


@pytest.mark.parametrize("init", ["osrm", "orthogonal", "lora-unit"])
def test_scale_matched_inits_have_unit_orthonormal_rows(tiny_bert, other_stats, init):
    peft_model, meta = initialised_model(tiny_bert, toy_task(), TrainConfig(init=init, rank=4), others=other_stats)
    assert meta == {"init": init}
    for m, A in lora_A(peft_model).items():
        norms = A.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=1e-5)
        if init != "lora-unit":
            torch.testing.assert_close(A @ A.T, torch.eye(4), rtol=0, atol=1e-5)
    for layer in lora_layers(peft_model).values():
        assert not layer.lora_B[peft_model.active_adapter].weight.any()   # B = 0: ΔW starts at 0


def test_same_seed_same_head_and_order(tiny_bert, other_stats):
    a = train_adapter(tiny_bert, toy_task(), TrainConfig(init="lora", rank=4, epochs=1), progress=False)
    b = train_adapter(tiny_bert, toy_task(), TrainConfig(init="lora", rank=4, epochs=1), progress=False)
    for m in a.modules:
        torch.testing.assert_close(a.delta(m), b.delta(m))
    assert a.heads.keys() == b.heads.keys() and all(torch.equal(a.heads[k], b.heads[k]) for k in a.heads)


def test_frozen_A_does_not_change(tiny_bert, other_stats):
    config = TrainConfig(init="osrm", rank=4, epochs=1, freeze="A")
    adapter = train_adapter(tiny_bert, toy_task(), config, others=other_stats, progress=False)
    initial = lora_A(initialised_model(tiny_bert, toy_task(), config, others=other_stats)[0])
    for m in adapter.modules:
        assert torch.equal(adapter.initial_A[m], initial[m])   # the adapter keeps the A it started from
        assert torch.equal(adapter.A[m], initial[m])
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


def test_train_command_options_are_the_config_fields():
    """Each ``orthomerge train`` option is derived from a TrainConfig field, default included."""
    from dataclasses import fields, replace

    from orthomerge.cli import build_parser
    from orthomerge.commands import dataclass_from_args
    from orthomerge.experiment import ExperimentConfig
    from orthomerge.models import parse_targets

    parse = build_parser().parse_args
    args = parse(["train", "--task", "toy", "--out", "x"])
    assert dataclass_from_args(TrainConfig, args) == TrainConfig()
    assert TrainConfig().lr == ExperimentConfig().train.lr == 5e-3   # one default learning rate
    args = parse(["train", "--task", "toy", "--out", "x", "--lr", "0.02", "--weight-decay", "0.1", "--freeze", "A",
                  "--targets", "value,query", "--subspace-k", "16", "--init", "osrm"])
    config = dataclass_from_args(TrainConfig, args, targets=parse_targets(args.targets))
    assert config == replace(TrainConfig(), lr=0.02, weight_decay=0.1, freeze="A", subspace_k=16, init="osrm",
                             targets=["query", "value"])
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert all(f"--{f.name.replace('_', '-')}" in help_text for f in fields(TrainConfig))
    with pytest.raises(SystemExit):
        parse(["train", "--task", "toy", "--out", "x", "--freeze", "C"])
