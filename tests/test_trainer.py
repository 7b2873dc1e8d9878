"""Training on transformers' Trainer: torchrun, the public callbacks in a plain user Trainer, the
library's gradient accumulation and checkpointing, the paper protocol, keeping the best epoch."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_train import other_stats, toy_task  # noqa: F401  (a fixture and the toy task)

from orthomerge.adapters import load_adapter
from orthomerge.callbacks import InterferenceRegulariser, InterferenceTrainer, SubspaceProjection
from orthomerge.config import PAPER_RECIPE, TrainConfig, protocol_deviations
from orthomerge.models import load_model, load_tokenizer
from orthomerge.osrm import init_peft_model_osrm, other_second_moment, smallest_eigenvectors
from orthomerge.train import lora_layers, train_adapter


@pytest.fixture(scope="module")
def still_bert(tmp_path_factory, tiny_bert):
    """tiny_bert without dropout: a training step is then a deterministic function of the weights."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("still_bert")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(path)
    return str(path)


def user_rows(tokenizer, task):
    """What a user's own script would hand its Trainer: tokenised rows with labels."""
    enc = tokenizer(task.train.texts, truncation=True, max_length=32)
    return [{**{k: enc[k][i] for k in enc}, "labels": y} for i, y in enumerate(task.train.labels)]


def user_trainer(peft_model, tokenizer, tmp_path, trainer_class=None, **kwargs):
    """A plain user Trainer (not orthomerge's): the user's own arguments, dataset and collator."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", save_strategy="no",
                             per_device_train_batch_size=8, learning_rate=2e-2, num_train_epochs=1,
                             disable_tqdm=True, seed=0)
    return (trainer_class or Trainer)(model=peft_model, args=args, train_dataset=user_rows(tokenizer, toy_task()),
                                      data_collator=DataCollatorWithPadding(tokenizer), **kwargs)


def fresh_peft_model(spec, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    model = load_model(spec).to(dtype)
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            task_type="SEQ_CLS"))


# ------------------------------------------------------------ the public pieces in a user's Trainer

def test_subspace_callback_keeps_A_in_its_subspace_in_a_plain_trainer(tiny_bert, other_stats, tmp_path):  # noqa: F811
    k = 8
    peft_model = fresh_peft_model(tiny_bert)
    init_peft_model_osrm(peft_model, other_stats)
    start = {m: layer.lora_A["default"].weight.detach().clone() for m, layer in lora_layers(peft_model).items()}
    trainer = user_trainer(peft_model, load_tokenizer(tiny_bert), tmp_path,
                           callbacks=[SubspaceProjection(peft_model, other_stats, k=k)])
    trainer.train()
    assert trainer.state.global_step > 0
    for m, layer in lora_layers(peft_model).items():
        U = torch.from_numpy(smallest_eigenvectors(other_second_moment(other_stats, m), k)[1].T.copy())
        A = layer.lora_A["default"].weight.detach().double()
        assert (A - A @ U @ U.T).abs().max() < 1e-6
        assert not torch.allclose(A.float(), start[m])   # it trained, within the subspace


def test_without_the_callback_A_leaves_the_subspace(tiny_bert, other_stats, tmp_path):  # noqa: F811
    """The control for the test above: the same run, no callback."""
    peft_model = fresh_peft_model(tiny_bert)
    init_peft_model_osrm(peft_model, other_stats)
    user_trainer(peft_model, load_tokenizer(tiny_bert), tmp_path).train()
    m, layer = next(iter(lora_layers(peft_model).items()))
    U = torch.from_numpy(smallest_eigenvectors(other_second_moment(other_stats, m), 8)[1].T.copy())
    A = layer.lora_A["default"].weight.detach().double()
    assert (A - A @ U @ U.T).abs().max() > 1e-4


def test_regulariser_gradient_in_a_user_trainer_matches_fd(still_bert, other_stats, tmp_path):  # noqa: F811
    """float64: the gradient one Trainer training step leaves on A equals the finite differences of the
    model's loss plus μ·Σ tr(A S̃ Aᵀ)/tr(A Aᵀ), S̃ = S_¬t / (tr S_¬t / n) computed here independently."""
    mu = 0.7
    peft_model = fresh_peft_model(still_bert, torch.float64)
    g = torch.Generator().manual_seed(1)
    for layer in lora_layers(peft_model).values():   # B ≠ 0, so the model's loss depends on A too
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(0.3 * torch.randn(layer.lora_B["default"].weight.shape, generator=g))
    tokenizer = load_tokenizer(still_bert)
    trainer = user_trainer(peft_model, tokenizer, tmp_path, trainer_class=InterferenceTrainer,
                           interference=InterferenceRegulariser(peft_model, other_stats, weight=mu))
    batch = trainer.data_collator(user_rows(tokenizer, toy_task())[:6])
    module, layer = next(iter(lora_layers(peft_model).items()))
    A = layer.lora_A["default"].weight
    moment = torch.from_numpy(other_second_moment(other_stats, module))
    moment = moment * len(moment) / torch.trace(moment)
    others = {m: torch.from_numpy(other_second_moment(other_stats, m)) for m in lora_layers(peft_model)}

    def objective() -> float:   # the model's loss + μ Σ penalties, without the Trainer
        with torch.no_grad():
            total = peft_model(**batch).loss.item()
            for m, lay in lora_layers(peft_model).items():
                a, s = lay.lora_A["default"].weight, others[m] * len(others[m]) / torch.trace(others[m])
                total += mu * (torch.trace(a @ s @ a.T) / torch.trace(a @ a.T)).item()
        return total

    peft_model.train()
    peft_model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1   # what the Trainer's loop sets per optimiser step
    trainer.training_step(peft_model, dict(batch))
    analytic = A.grad.detach().clone()
    numeric = torch.zeros_like(A)
    eps = 1e-6
    for i in range(A.shape[0]):
        for j in range(A.shape[1]):
            with torch.no_grad():
                A[i, j] += eps
            up = objective()
            with torch.no_grad():
                A[i, j] -= 2 * eps
            down = objective()
            with torch.no_grad():
                A[i, j] += eps
            numeric[i, j] = (up - down) / (2 * eps)
    assert analytic.abs().max() > 1e-3
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)
    assert moment.shape[0] == A.shape[1]


# ------------------------------------------------------------ orthomerge's own training on Trainer

def test_gradient_accumulation_equals_the_larger_batch(still_bert, other_stats):  # noqa: F811
    """4 rows × 2 accumulation steps = 8 rows × 1 (the same rows per step, no dropout), interference
    term included: the library's accumulation, with the term counted once per optimiser step."""
    base = dict(rank=4, epochs=1, lr=1e-2, interference_weight=0.5)
    one = train_adapter(still_bert, toy_task(), TrainConfig(batch_size=8, **base), others=other_stats,
                        progress=False)
    two = train_adapter(still_bert, toy_task(), TrainConfig(batch_size=4, gradient_accumulation=2, **base),
                        others=other_stats, progress=False)
    assert one.metadata["steps"] == two.metadata["steps"] == int(np.ceil(len(toy_task().train) / 8))
    for m in one.modules:
        torch.testing.assert_close(one.A[m], two.A[m], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(one.B[m], two.B[m], rtol=1e-4, atol=1e-5)


def test_causal_lm_accumulation_equals_the_larger_batch(tmp_path):
    """A causal LM's loss is normalised over the accumulated batch's completion tokens (num_items_in_batch):
    4 × 2 = 8 × 1 there too, with the interference term divided by the steps instead."""
    from trust_fixtures import save_llama

    from orthomerge.stats import collect_stats

    base = str(save_llama(tmp_path / "llama", causal=True))
    model, tok = load_model(base, task_type="CAUSAL_LM"), load_tokenizer(base)
    others = [collect_stats(model, tok, ["what city is the star from", "win a free prize call now"] * 3,
                            ["q_proj", "v_proj"], progress=False)]
    base_config = dict(task_type="CAUSAL_LM", rank=4, epochs=1, lr=1e-2, interference_weight=0.5,
                       targets=["q_proj", "v_proj"], prompt="{text} is")
    one = train_adapter(base, toy_task(), TrainConfig(batch_size=8, **base_config), others=others, progress=False)
    two = train_adapter(base, toy_task(), TrainConfig(batch_size=4, gradient_accumulation=2, **base_config),
                        others=others, progress=False)
    assert one.metadata["steps"] == two.metadata["steps"]
    for m in one.modules:
        torch.testing.assert_close(one.A[m], two.A[m], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(one.B[m], two.B[m], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_trains_the_same_adapter(tiny_bert):
    """Recomputing activations (dropout included) changes memory, not the result."""
    config = dict(rank=4, epochs=1, lr=1e-2, batch_size=8)
    plain = train_adapter(tiny_bert, toy_task(), TrainConfig(**config), progress=False)
    checkpointed = train_adapter(tiny_bert, toy_task(), TrainConfig(gradient_checkpointing=True, **config),
                                 progress=False)
    for m in plain.modules:
        torch.testing.assert_close(plain.delta(m), checkpointed.delta(m), rtol=1e-4, atol=1e-6)


def test_bf16_mixed_precision_trains_float32_factors(tiny_bert):
    adapter = train_adapter(tiny_bert, toy_task(), TrainConfig(rank=4, epochs=1, batch_size=8, precision="bf16"),
                            progress=False)
    assert all(a.dtype == torch.float32 and a.isfinite().all() for a in adapter.A.values())
    assert any(b.abs().sum() > 0 for b in adapter.B.values())


def test_keep_best_restores_the_best_epoch(tiny_bert, monkeypatch):
    """The weights returned are those of the epoch with the best validation score, not the last."""
    from orthomerge import train as train_module

    scores = iter([0.9, 0.2, 0.5])
    snapshots = []
    real = train_module.EpochValidation.on_epoch_end

    def spy(self, args, state, control, model=None, **kwargs):
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        real(self, args, state, control, model=model, **kwargs)

    monkeypatch.setattr(train_module, "validation_score", lambda *a, **k: next(scores))
    monkeypatch.setattr(train_module.EpochValidation, "on_epoch_end", spy)
    adapter = train_adapter(tiny_bert, toy_task(), TrainConfig(rank=4, epochs=3, keep_best=True), progress=False)
    assert adapter.metadata["best_epoch"] == 1
    assert [h["val_accuracy"] for h in adapter.metadata["history"]] == [0.9, 0.2, 0.5]
    first = {n: v for n, v in snapshots[0].items() if "lora_A" in n}
    for m in adapter.modules:
        (key,) = [n for n in first if f".{m}.lora_A" in n]
        assert torch.equal(adapter.A[m], first[key]) and not torch.equal(adapter.A[m], snapshots[2][key])


def test_paper_protocol_reaches_the_trainer(tiny_bert, monkeypatch):
    """The TrainingArguments the Trainer actually ran with, and the LoRA it trained, carry the recipe."""
    from transformers import Trainer

    seen = {}
    real_train = Trainer.train

    def spy(self, *args, **kwargs):
        seen["args"], seen["rows"] = self.args, self.train_dataset
        seen["model_accepts_loss_kwargs"] = self.model_accepts_loss_kwargs
        out = real_train(self, *args, **kwargs)
        seen["scheduler"], seen["optimizer"] = self.lr_scheduler, self.optimizer
        return out

    monkeypatch.setattr(Trainer, "train", spy)
    config = TrainConfig.protocol("paper", epochs=1)
    adapter = train_adapter(tiny_bert, toy_task(repeat=4), config, progress=False)
    args = seen["args"]
    assert args.learning_rate == 4e-4 and args.weight_decay == 0 and args.max_grad_norm == 1.0
    assert args.lr_scheduler_type == "linear" and args.warmup_steps == 0.06
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size == 64
    assert args.seed == args.data_seed == config.seed and args.num_train_epochs == 1
    assert type(seen["optimizer"].optimizer).__name__ == "AdamW"
    assert seen["optimizer"].param_groups[0]["betas"] == (0.9, 0.999)
    assert config.keep_best and adapter.metadata["best_epoch"] == 1
    assert all(len(r["input_ids"]) <= 128 for r in seen["rows"]) and config.max_length == 128
    assert adapter.config["r"] == 8 and adapter.config["lora_alpha"] == 16
    assert {m.rsplit(".", 1)[-1] for m in adapter.modules} == {"query", "value"}
    # linear warm-up over ceil(6% of the steps), then linear decay to 0
    steps = adapter.metadata["steps"]
    assert steps == int(np.ceil(len(toy_task(repeat=4).train) / 64))
    assert seen["scheduler"].get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_protocol_presets_and_deviations():
    paper = TrainConfig.protocol("paper")
    assert (paper.lr, paper.warmup, paper.weight_decay, paper.batch_size * paper.gradient_accumulation,
            paper.max_length, paper.keep_best, paper.rank, paper.alpha, paper.targets) == (
        4e-4, 0.06, 0.0, 64, 128, True, 8, 16.0, ["auto"])
    assert TrainConfig.protocol("default") == TrainConfig()
    assert TrainConfig.protocol("paper", lr=1e-3).lr == 1e-3
    assert protocol_deviations(TrainConfig.protocol("paper", epochs=10, precision="bf16")) == []
    assert protocol_deviations(paper) == [f"epochs: {paper.epochs} (official: 10)", "precision: no (official: bf16)"]
    half = TrainConfig.protocol("paper", epochs=10, precision="bf16", batch_size=32, gradient_accumulation=2)
    assert protocol_deviations(half) == []
    assert "batch: 32 × 1 accumulation (official: 64)" in protocol_deviations(TrainConfig())
    assert set(PAPER_RECIPE) >= {"lr", "warmup", "weight_decay", "batch", "max_length", "keep_best", "epochs"}
    with pytest.raises(Exception, match="unknown protocol"):
        TrainConfig.protocol("nope")


def test_cli_protocol_preset_with_explicit_overrides():
    from orthomerge.cli import build_parser
    from orthomerge.commands.train import train_config

    parse = build_parser().parse_args
    config = train_config(parse(["train", "--task", "toy", "--out", "x", "--protocol", "paper", "--epochs", "3",
                                 "--lr", "5e-3", "--no-keep-best"]))
    assert config == TrainConfig.protocol("paper", epochs=3, lr=5e-3, keep_best=False)   # 5e-3 = the default lr
    config = train_config(parse(["train", "--task", "toy", "--out", "x", "--keep-best", "--precision", "bf16"]))
    assert config == TrainConfig(keep_best=True, precision="bf16")


# ------------------------------------------------------------ data-parallel

def test_two_gloo_processes_write_an_adapter_like_one(tiny_bert, tmp_path):
    """``torchrun --nproc_per_node 2`` trains data-parallel (half of each batch per process, the same
    optimiser steps) and only rank 0 writes: the adapter has the single-process one's modules, shapes and
    metadata keys, and loads with PEFT."""
    from peft import PeftModel

    task = toy_task()
    for name, split in (("train", task.train), ("held", task.validation)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "label": task.label_names[y]}) + "\n"
                                                        for t, y in zip(split.texts, split.labels)))
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("- {name: toy, train: train.jsonl, validation: held.jsonl}\n")
    common = ["train", "--model", tiny_bert, "--tasks", str(tasks), "--task", "toy", "--train-size", "48",
              "--val-size", "8", "--test-size", "8", "--epochs", "2", "--batch-size", "8", "--rank", "4"]
    single = subprocess.run([sys.executable, "-m", "orthomerge.cli", *common, "--quiet",
                             "--out", str(tmp_path / "one")], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", "29547", "-m", "orthomerge.cli", *common, "--out", str(tmp_path / "two")],
                           capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr
    assert multi.stdout.count('"epoch": 2') == 1   # the history is printed by rank 0 alone
    one, two = load_adapter(tmp_path / "one"), load_adapter(tmp_path / "two")
    assert one.modules == two.modules and one.heads.keys() == two.heads.keys()
    assert all(one.A[m].shape == two.A[m].shape and one.B[m].shape == two.B[m].shape for m in one.modules)
    assert one.metadata.keys() == two.metadata.keys()
    assert (one.metadata["processes"], two.metadata["processes"]) == (1, 2)
    assert one.metadata["steps"] == two.metadata["steps"] == 2 * 6   # 48 rows / 8 per step, 2 epochs
    assert all(b.abs().sum() > 0 for b in two.B.values())
    assert not any(torch.equal(one.B[m], two.B[m]) for m in one.modules)   # trained on its own
    peft_model = PeftModel.from_pretrained(load_model(tiny_bert), str(tmp_path / "two"))
    state = dict(peft_model.named_parameters())
    for m in two.modules:
        (key,) = [k for k in state if k.endswith(f"{m}.lora_B.default.weight")]
        assert torch.equal(state[key].detach(), two.B[m])
