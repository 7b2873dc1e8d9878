"""LoRA fine-tuning of one task on transformers' ``Trainer``, with the standard init, OSRM, or controls.

Every init sees the same head init, data order and hyper-parameters for a given seed (``Trainer``'s
``seed`` and ``data_seed``), so arms differ only in how ``A`` starts (and, optionally, how it may move):
that is what makes comparisons fair. Because the loop is ``Trainer``'s, ``torchrun`` / ``accelerate
launch`` run it data-parallel, and mixed precision, gradient accumulation and checkpointing are its own.

Inits: ``lora`` (PEFT default, Kaiming-uniform A), ``gaussian`` (PEFT's ``init_lora_weights="gaussian"``,
A ~ N(0, 1/r²): the paper's baseline), ``osrm`` (paper), ``orthogonal`` (a random orthonormal A, unit rows,
data-free), ``lora-unit`` (the PEFT default A rescaled to unit rows). Options that keep A near its
subspace: ``freeze="A"``; ``subspace_k`` and ``interference_weight``, the public pieces of
:mod:`orthomerge.callbacks` (a projection callback and a loss term) that a user's own Trainer can take too.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, replace

import numpy as np
import torch
from transformers import TrainerCallback

from . import causal, encoding
from .adapters import LoraAdapter, from_peft_model, lora_layers, new_peft_model, set_lora_A
from .callbacks import (InterferenceRegulariser, InterferenceTrainer, SubspaceProjection,  # noqa: F401
                        interference_penalty)
from .config import DEFAULT_DEVICE, DEFAULT_DTYPE, INITS, TrainConfig  # noqa: F401  (importable from here)
from .errors import OrthomergeError
from .evaluate import input_energy, predict
from .models import load_model, load_tokenizer, resolve_device
from .osrm import osrm_bases
from .stats import ActivationStats
from .tasks import Task, compute_metric


def initialise(peft_model, config: TrainConfig, others: list[ActivationStats] | None,
               own: ActivationStats | None) -> dict:
    """Set A per ``config.init`` (B stays 0), then scaled by :func:`compensate_A` when ``config.compensate``.
    Returns metadata describing the init (with ``compensation``, the factor, when scaled)."""
    name = peft_model.active_adapter
    layers = lora_layers(peft_model)
    generator = torch.Generator().manual_seed(config.seed + 1)
    if config.init == "osrm":
        bases = osrm_bases(list(layers), others, config.rank, config.variant, own, config.beta,
                           model=peft_model.get_base_model())
    elif config.init == "orthogonal":
        bases = {}
        for m, layer in layers.items():
            n = layer.lora_A[name].weight.shape[1]
            q, _ = torch.linalg.qr(torch.randn(n, config.rank, generator=generator, dtype=torch.float64))
            bases[m] = q.T
    elif config.init == "lora-unit":
        bases = {m: torch.nn.functional.normalize(layer.lora_A[name].weight.detach().double(), dim=1)
                 for m, layer in layers.items()}
    else:   # lora, gaussian: PEFT's own init, already in place
        bases = None
    if bases is not None:
        set_lora_A(peft_model, bases)
    meta = {"init": config.init}
    if config.compensate:
        meta["compensation"] = compensate_A(peft_model, own)
    return meta


def compensate_A(peft_model, own: ActivationStats | None) -> float:
    """Multiply every ``A`` by ``c = 1/√e``, ``e`` = the task's own per-token input energy through ``A``
    relative to a random ``A`` of the same norm (:func:`~orthomerge.evaluate.input_energy`), so that the
    scaled ``A`` passes as much of the task's own input energy as a random ``A`` of the original norm: an
    in-subspace ``A`` (OSRM's, frozen or projected) passes ~5% of it on MiniLM and its adapter starves.
    Returns ``c``."""
    if own is None:
        raise OrthomergeError("compensate needs the task's own statistics")
    A = {m: layer.lora_A[peft_model.active_adapter].weight for m, layer in lora_layers(peft_model).items()}
    factor = input_energy({m: a.detach().cpu() for m, a in A.items()}, own) ** -0.5
    with torch.no_grad():
        for a in A.values():
            a.mul_(factor)
    return float(factor)


def validation_score(model, tokenizer, task: Task, config: TrainConfig) -> float:
    """The task's metric on its validation split (a head's predictions, or label scoring of a causal LM)."""
    if config.task_type == "CAUSAL_LM":
        return causal.score_split(model, tokenizer, task.validation, task.label_names, task.metric,
                                  causal.task_template(task, config.prompt), config.max_length)
    return compute_metric(task.metric, predict(model, tokenizer, task.validation, config.max_length),
                          task.validation.labels)


def initialised_model(model_spec: str, task: Task, config: TrainConfig,
                      others: list[ActivationStats] | None = None, own: ActivationStats | None = None,
                      device=DEFAULT_DEVICE, dtype=DEFAULT_DTYPE):
    """``(peft_model, init metadata)``: the base model (with ``task``'s fresh head for ``SEQ_CLS``), wrapped
    in a LoRA whose A is set per ``config.init`` (B = 0), before any training step: what
    :func:`train_adapter` starts from. ``device`` / ``dtype`` place the base (see :mod:`orthomerge.models`)."""
    config.check()
    with _seeded(config.seed, device):
        return _initialised(model_spec, task, config, others, own, device, dtype)


@contextlib.contextmanager
def _seeded(seed: int, device):
    """torch's global generators seeded with ``seed`` for the duration; the caller's torch (CPU and CUDA),
    numpy and python ``random`` states and environment restored after (``Trainer`` calls ``set_seed``,
    which seeds all three). PEFT's A init and the model's dropout draw from them, so a seed fixes both."""
    device = resolve_device(device)
    cuda = (list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized()
            else [device] if device.type == "cuda" else [])
    python_state, numpy_state, environment = random.getstate(), np.random.get_state(), dict(os.environ)
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        if dict(os.environ) != environment:   # e.g. accelerate's ACCELERATE_* switches
            os.environ.clear()
            os.environ.update(environment)


def _initialised(model_spec, task, config, others, own, device, dtype):
    """:func:`initialised_model` inside :func:`_seeded` (training continues the same random stream)."""
    if config.task_type == "CAUSAL_LM" and task.is_regression:
        raise OrthomergeError(f"task {task.name!r} is a regression; a causal LM learns labels as completions")
    if config.task_type != "CAUSAL_LM" and task.is_completion:
        raise OrthomergeError(f"task {task.name!r} is a prompt → completion task: train it with task type CAUSAL_LM")
    model = load_model(model_spec, num_labels=task.num_labels, regression=task.is_regression, seed=config.seed,
                       task_type=config.task_type, dtype=dtype, device=resolve_device(device))
    torch.manual_seed(config.seed)
    peft_model = new_peft_model(model, config.targets, config.rank, config.alpha, task_type=config.task_type,
                                init="gaussian" if config.init == "gaussian" else True)
    return peft_model, initialise(peft_model, config, others, own)


def lora_A(peft_model) -> dict[str, torch.Tensor]:
    """A copy of every module's ``A`` (active adapter)."""
    return {m: layer.lora_A[peft_model.active_adapter].weight.detach().cpu().clone()
            for m, layer in lora_layers(peft_model).items()}


def training_rows(task: Task, config: TrainConfig, tokenizer) -> list[dict]:
    """The task's training rows, tokenised and unpadded, with their ``labels``: the Trainer's dataset
    (a head's class id / float, or a causal LM's prompt + completion with labels on the completion only)."""
    if config.task_type == "CAUSAL_LM":
        data = causal.verbalise(task.train, task.label_names, causal.task_template(task, config.prompt),
                                tokenizer=tokenizer)
        return causal.encode_completions(tokenizer, data.prompts, data.completions, config.max_length,
                                         special_tokens=data.special_tokens)
    rows = encoding.encode(tokenizer, task.train, config.max_length)
    for row, label in zip(rows, task.train.labels):
        row["labels"] = float(label) if task.is_regression else int(label)
    return rows


def collator(config: TrainConfig, tokenizer):
    """Dynamic padding to the batch's longest row (transformers' collators; causal-LM labels padded with
    IGNORE, see :func:`orthomerge.causal.collate`)."""
    if config.task_type == "CAUSAL_LM":
        from functools import partial

        return partial(causal.collate, tokenizer)
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def training_arguments(config: TrainConfig, output_dir: str, progress: bool = True, device=DEFAULT_DEVICE):
    """``TrainingArguments`` from ``config``: AdamW (torch), linear schedule with ``warmup`` as a fraction of
    the steps, ``seed`` = ``data_seed`` = ``config.seed``; ``batch_size`` split over the processes (and GPUs
    of a single process), so the rows per optimiser step are the same however the run is launched.
    Nothing is saved or reported (the adapter is what :func:`train_adapter` returns); the loss is logged
    once per epoch."""
    from transformers import TrainingArguments

    cpu = resolve_device(device).type == "cpu"
    if config.precision == "fp16" and resolve_device(device).type != "cuda":
        raise OrthomergeError(f"precision fp16 needs a CUDA device, not {resolve_device(device)} (bf16 runs anywhere)")
    args = TrainingArguments(
        output_dir=output_dir, num_train_epochs=config.epochs, learning_rate=config.lr,
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, optim="adamw_torch",
        lr_scheduler_type="linear", warmup_steps=config.warmup,   # a float < 1: a fraction of the steps
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation,
        bf16=config.precision == "bf16", fp16=config.precision == "fp16",
        activation_checkpointing=config.gradient_checkpointing,   # transformers 5's name for it
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        seed=config.seed, data_seed=config.seed, use_cpu=cpu, dataloader_pin_memory=not cpu,
        eval_strategy="no", save_strategy="no", logging_strategy="epoch", report_to="none",
        disable_tqdm=not progress, remove_unused_columns=False, label_names=["labels"],
    )
    shares = args.world_size * max(1, args.n_gpu)
    if config.batch_size % shares:
        raise OrthomergeError(f"batch size {config.batch_size} does not split evenly over {shares} devices")
    args.per_device_train_batch_size = config.batch_size // shares
    return args


class EpochValidation(TrainerCallback):
    """The validation score after every epoch (recorded in ``history``) and, with ``keep_best``, the
    trainable weights of the best epoch kept in memory and restored at train end: the paper code's best
    checkpoint, without writing checkpoints. (Not ``Trainer.evaluate``: a causal LM is scored by the
    likelihood of each label's completion, which its loop does not compute.)"""

    def __init__(self, score, keep_best: bool):
        self.score, self.keep_best = score, keep_best
        self.history, self.best, self.best_epoch, self.best_state, self.seconds = [], -math.inf, 0, None, 0.0

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        started = time.time()
        value = self.score(model)
        self.seconds += time.time() - started
        self.history.append({"epoch": len(self.history) + 1, "value": value})
        if not self.keep_best or (not math.isnan(value) and value > self.best):
            self.best, self.best_epoch = value, len(self.history)
            if self.keep_best:
                self.best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.train()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in (logs or {}) and self.history and "train_loss" not in self.history[-1]:
            self.history[-1]["train_loss"] = float(logs["loss"])

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.best_state is not None:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in self.best_state:
                        p.copy_(self.best_state[n])


def build_trainer(peft_model, tokenizer, task: Task, config: TrainConfig, args, others=None, callbacks=()):
    """orthomerge's ``Trainer`` for one task: the library's loop, optimiser, schedule and collator, plus the
    constraints of :mod:`orthomerge.callbacks` that ``config`` asks for (projection, interference term)."""
    from transformers import PrinterCallback

    extra = list(callbacks)
    if config.subspace_k:
        extra.append(SubspaceProjection(peft_model, others, config.subspace_k))
    interference = (InterferenceRegulariser(peft_model, others, config.interference_weight)
                    if config.interference_weight else None)
    trainer = InterferenceTrainer(model=peft_model, args=args, train_dataset=training_rows(task, config, tokenizer),
                                  data_collator=collator(config, tokenizer), callbacks=extra,
                                  interference=interference)
    trainer.remove_callback(PrinterCallback)   # quiet runs print nothing
    if config.task_type == "SEQ_CLS":
        # A head's loss is a per-batch mean that ignores num_items_in_batch although its forward takes
        # **kwargs: told so, the Trainer divides it by the accumulation steps (and does not multiply it by
        # the process count) instead of inflating it (transformers issue #47688)
        trainer.model_accepts_loss_kwargs = False
    return trainer


def train_adapter(model_spec: str, task: Task, config: TrainConfig,
                  others: list[ActivationStats] | None = None, own: ActivationStats | None = None,
                  progress: bool = True, device=DEFAULT_DEVICE, dtype=DEFAULT_DTYPE) -> LoraAdapter:
    """Fine-tune a LoRA (and the task head, for ``SEQ_CLS``) on ``task.train`` with transformers'
    ``Trainer``; validate after every epoch (``history``) and keep the last epoch, or the best with
    ``config.keep_best``. ``device`` / ``dtype``: where and in which precision the base runs (the LoRA
    factors stay float32); under ``torchrun`` each process trains on its own device. The caller's random
    state (torch, numpy, python) is left as it was. Every process returns the same adapter."""
    config.check()
    if config.needs_stats and not others:
        raise OrthomergeError(f"init {config.init!r} with these options needs the other tasks' statistics")
    if config.compensate and own is None:
        raise OrthomergeError("compensate needs the task's own statistics")
    if config.task_type == "CAUSAL_LM":   # the adapter records the template it learned (a task's own, e.g. chat)
        config = replace(config, prompt=causal.task_template(task, config.prompt) or "")
    with _seeded(config.seed, device), tempfile.TemporaryDirectory(prefix="orthomerge-train-") as scratch:
        return _train(model_spec, task, config, others, own, progress, device, dtype, scratch)


def _train(model_spec, task, config, others, own, progress, device, dtype, scratch) -> LoraAdapter:
    """:func:`train_adapter`'s body, inside :func:`_seeded`."""
    started = time.time()
    args = training_arguments(config, scratch, progress, device)
    asked = resolve_device(device)
    if asked.index is not None and asked != args.device and args.world_size == 1:
        raise OrthomergeError(f"device {asked}: the Trainer trains on {args.device}; select the GPU with "
                              "CUDA_VISIBLE_DEVICES instead")
    tokenizer = load_tokenizer(model_spec)
    peft_model, init_meta = _initialised(model_spec, task, config, others, own, args.device, dtype)
    initial_A = lora_A(peft_model)
    for name, p in peft_model.named_parameters():
        if (config.freeze == "A" and "lora_A" in name) or (config.freeze == "B" and "lora_B" in name):
            p.requires_grad_(False)
    validation = EpochValidation(lambda model: validation_score(model, tokenizer, task, config), config.keep_best)
    trainer = build_trainer(peft_model, tokenizer, task, config, args, others, [validation])
    trainer.train()
    history = [{"epoch": h["epoch"], "train_loss": h.get("train_loss", float("nan")), f"val_{task.metric}": h["value"]}
               for h in validation.history]
    metadata = {
        **init_meta, "task": task.name, "metric": task.metric, "labels": task.label_names,
        "config": asdict(config), "history": history, "best_epoch": validation.best_epoch,
        "train_seconds": round(time.time() - started, 1), "validation_seconds": round(validation.seconds, 1),
        "processes": args.world_size, "steps": trainer.state.global_step,
        "model": model_spec, "dtype": str(next(peft_model.get_base_model().parameters()).dtype).replace("torch.", ""),
    }
    adapter = from_peft_model(peft_model.eval(), metadata=metadata)
    adapter.initial_A = initial_A
    return adapter
