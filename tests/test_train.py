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


def test_gaussian_init_is_peft_gaussian(tiny_bert):
    """``gaussian`` = PEFT's ``init_lora_weights="gaussian"``: A ~ N(0, 1/r²) (std 1/r, on a layer big enough
    to estimate it), B = 0, the base's logits at init, and PEFT's own A for the same seed."""
    from peft import LoraConfig, get_peft_model

    rank = 4
    config = TrainConfig(init="gaussian", rank=rank, seed=3)
    peft_model, meta = initialised_model(tiny_bert, toy_task(), config)
    assert meta == {"init": "gaussian"}
    A = torch.cat([a.flatten() for a in lora_A(peft_model).values()]).double()   # 4 modules × 4 × 32 = 512 draws
    # std of the sample std of n normals ≈ σ / √(2n): 1/r ± 4 of those
    assert abs(A.std().item() - 1 / rank) < 4 / rank / np.sqrt(2 * A.numel())
    assert abs(A.mean().item()) < 4 / rank / np.sqrt(A.numel())
    for layer in lora_layers(peft_model).values():
        assert not layer.lora_B["default"].weight.any()
    tok = load_tokenizer(tiny_bert)
    batch = tok(["great movie", "what city is the star from"], return_tensors="pt", padding=True)
    base = load_model(tiny_bert, num_labels=2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(**batch).logits, base.eval()(**batch).logits)
    torch.manual_seed(3)   # PEFT's own gaussian init, drawn from the same seed
    reference = get_peft_model(load_model(tiny_bert, num_labels=2, seed=3),
                               LoraConfig(r=rank, lora_alpha=16, target_modules=["query", "value"],
                                          init_lora_weights="gaussian", task_type="SEQ_CLS"))
    ours = lora_A(peft_model)
    for m, A in lora_A(reference).items():
        assert torch.equal(ours[m], A)


def test_gaussian_rows_have_peft_norm_on_a_wide_layer():
    """On a 1024-wide layer (r = 8) the rows of PEFT's gaussian A have norm ≈ √n / r = 4: the scale the
    paper's baseline starts from (OSRM's rows have norm 1)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(1024, 16)),
                                LoraConfig(r=8, target_modules=["0"], init_lora_weights="gaussian"))
    A = next(iter(lora_A(peft_model).values()))
    assert abs(A.std().item() - 1 / 8) < 4 / 8 / np.sqrt(2 * A.numel())
    np.testing.assert_allclose(A.norm(dim=1).mean().item(), 4.0, rtol=0.05)


def test_every_arm_gets_the_same_head_init_and_data_order(tiny_bert, other_stats, monkeypatch):
    """For a seed, arms differ only in A: the same head before training and the same batches in the same
    order (Trainer's seed / data_seed), epoch after epoch; another seed changes the order."""
    from orthomerge import train as train_module

    batches, heads = [], []
    real = train_module.build_trainer

    def spy(peft_model, *args, **kwargs):
        heads.append({k: v.detach().clone() for k, v in peft_model.named_parameters() if "classifier" in k})
        record = []
        batches.append(record)
        peft_model.get_base_model().bert.embeddings.register_forward_pre_hook(
            lambda module, args, kwargs: record.append(kwargs["input_ids"].tolist()) if module.training else None,
            with_kwargs=True)
        return real(peft_model, *args, **kwargs)

    monkeypatch.setattr(train_module, "build_trainer", spy)
    from dataclasses import replace

    task = replace(toy_task(), label_names=["negative", "positive", "neutral"])   # 3 labels: a fresh head
    for init in ("lora", "osrm", "gaussian"):
        train_adapter(tiny_bert, task, TrainConfig(init=init, rank=4, epochs=2, batch_size=8),
                      others=other_stats, progress=False)
    train_adapter(tiny_bert, task, TrainConfig(rank=4, epochs=2, batch_size=8, seed=1), progress=False)
    assert len(batches[0]) == 2 * 12   # 96 rows / 8, two epochs
    assert batches[0] == batches[1] == batches[2] != batches[3]
    assert batches[0][:12] != batches[0][12:]   # a new order each epoch
    for h in heads[1:3]:
        assert h.keys() == heads[0].keys() and all(torch.equal(h[k], heads[0][k]) for k in h)
    (weight,) = [k for k in heads[0] if k.endswith("modules_to_save.default.weight")]
    assert not torch.equal(heads[3][weight], heads[0][weight])   # the seed draws the head


def test_training_leaves_the_callers_random_state(tiny_bert):
    """Trainer seeds torch, numpy and python's random: after train_adapter all three continue as before."""
    import os
    import random

    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    environment = dict(os.environ)
    train_adapter(tiny_bert, toy_task(), TrainConfig(rank=4, epochs=1, batch_size=16, precision="bf16"),
                  progress=False)
    assert torch.equal(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]
    assert dict(os.environ) == environment


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
    from orthomerge.commands.train import train_config
    from orthomerge.experiment import ExperimentConfig

    parse = build_parser().parse_args
    args = parse(["train", "--task", "toy", "--out", "x"])
    assert train_config(args) == TrainConfig()
    assert TrainConfig().lr == ExperimentConfig().train.lr == 5e-3   # one default learning rate
    args = parse(["train", "--task", "toy", "--out", "x", "--lr", "0.02", "--weight-decay", "0.1", "--freeze", "A",
                  "--targets", "value,query", "--subspace-k", "16", "--init", "osrm", "--gradient-accumulation", "2",
                  "--precision", "bf16", "--gradient-checkpointing", "--keep-best", "--max-grad-norm", "1"])
    config = train_config(args)
    assert config == replace(TrainConfig(), lr=0.02, weight_decay=0.1, freeze="A", subspace_k=16, init="osrm",
                             targets=["query", "value"], gradient_accumulation=2, precision="bf16",
                             gradient_checkpointing=True, keep_best=True, max_grad_norm=1.0)
    assert train_config(parse(["train", "--task", "toy", "--out", "x", "--init", "gaussian"])).init == "gaussian"
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert all(f"--{f.name.replace('_', '-')}" in help_text for f in fields(TrainConfig))
    with pytest.raises(SystemExit):
        parse(["train", "--task", "toy", "--out", "x", "--freeze", "C"])
