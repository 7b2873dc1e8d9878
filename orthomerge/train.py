"""LoRA fine-tuning of one task, with the standard init, OSRM, or scale-matched controls.

Every init sees the same head init, data order and hyper-parameters for a given seed, so arms differ
only in how ``A`` starts (and, optionally, how it may move): that is what makes comparisons fair.

Inits: ``lora`` (PEFT default, Kaiming-uniform A), ``osrm`` (paper), ``orthogonal`` (a random orthonormal
A, unit rows, data-free), ``lora-unit`` (the PEFT default A rescaled to unit rows). Options that keep A
near its subspace: ``freeze="A"``; ``subspace_k`` (A may only rotate within the k lowest-interference
directions: projected after every step); ``interference_weight`` μ (adds μ·tr(A S_¬t Aᵀ)/tr(A Aᵀ), with
S_¬t divided by its mean eigenvalue so μ does not depend on the activations' scale).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

from . import causal, encoding
from .adapters import LoraAdapter, from_peft_model, lora_layers, new_peft_model, set_lora_A
from .config import DEFAULT_DEVICE, DEFAULT_DTYPE, INITS, TrainConfig  # noqa: F401  (importable from here)
from .errors import OrthomergeError
from .evaluate import predict
from .models import load_model, load_tokenizer, resolve_device
from .osrm import osrm_bases, other_second_moment, smallest_eigenvectors
from .stats import ActivationStats
from .tasks import Task, compute_metric


def initialise(peft_model, config: TrainConfig, others: list[ActivationStats] | None,
               own: ActivationStats | None) -> dict:
    """Set A per ``config.init`` (B stays 0). Returns metadata describing the init."""
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
    else:
        return {"init": "lora"}
    set_lora_A(peft_model, bases)
    return {"init": config.init}


def _batches(encodings: list[dict], labels: list, order: list[int], batch_size: int, tokenizer, regression: bool,
             device=None):
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = encoding.pad(tokenizer, encodings, idx, device)
        dtype = torch.float32 if regression else torch.long
        batch["labels"] = torch.tensor([labels[i] for i in idx], dtype=dtype, device=device)
        yield batch


def _training_batches(task: Task, config: TrainConfig, tokenizer, order: list[int], device):
    """The task's training rows in ``order``: labelled (a head) or prompt + completion (a causal LM)."""
    if config.task_type == "CAUSAL_LM":
        return causal.training_batches(tokenizer, task.train, task.label_names, config.prompt or None,
                                       config.max_length, order, config.batch_size, device)
    encodings = encoding.encode(tokenizer, task.train, config.max_length)
    return _batches(encodings, task.train.labels, order, config.batch_size, tokenizer, task.is_regression, device)


def validation_score(model, tokenizer, task: Task, config: TrainConfig) -> float:
    """The task's metric on its validation split (a head's predictions, or label scoring of a causal LM)."""
    if config.task_type == "CAUSAL_LM":
        return causal.score_split(model, tokenizer, task.validation, task.label_names, task.metric,
                                  config.prompt or None, config.max_length)
    return compute_metric(task.metric, predict(model, tokenizer, task.validation, config.max_length),
                          task.validation.labels)


class _Constraints:
    """Subspace projection and interference regulariser, both from the other tasks' statistics."""

    def __init__(self, peft_model, config: TrainConfig, others: list[ActivationStats] | None):
        self.name = peft_model.active_adapter
        self.layers = lora_layers(peft_model)
        self.projectors, self.moments = {}, {}
        if not (config.subspace_k or config.interference_weight):
            return
        if not others:
            raise OrthomergeError("subspace/interference options need the other tasks' statistics")
        for m in self.layers:
            like = self.layers[m].lora_A[self.name].weight   # the A's device and dtype
            moment = other_second_moment(others, m)
            if config.subspace_k:
                _, rows = smallest_eigenvectors(moment, config.subspace_k)
                u = torch.from_numpy(rows.T).float()
                self.projectors[m] = (u @ u.T).to(like)
            if config.interference_weight:  # S / (tr S / n): μ is dimensionless, the penalty's mean is 1
                self.moments[m] = torch.from_numpy(moment * len(moment) / np.trace(moment)).to(like)
        self.mu = config.interference_weight

    def project(self) -> None:
        """Put each A back into its allowed subspace (after every optimiser step and at the start)."""
        with torch.no_grad():
            for m, p in self.projectors.items():
                w = self.layers[m].lora_A[self.name].weight
                w.copy_(w @ p)

    def penalty(self) -> torch.Tensor | float:
        """μ · Σ_modules tr(A S_¬t Aᵀ) / tr(A Aᵀ)."""
        if not self.moments:
            return 0.0
        total = 0.0
        for m, s in self.moments.items():
            total = total + interference_penalty(self.layers[m].lora_A[self.name].weight, s)
        return self.mu * total


def interference_penalty(A: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """tr(A S Aᵀ) / tr(A Aᵀ): the other tasks' mean energy through A, scale-free."""
    return torch.einsum("rn,nm,rm->", A, moment, A) / (A * A).sum()


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
    """torch's global generators seeded with ``seed`` for the duration, the caller's state restored after:
    PEFT's A init and the model's dropout draw from them, so a seed fixes both."""
    device = resolve_device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _initialised(model_spec, task, config, others, own, device, dtype):
    """:func:`initialised_model` inside :func:`_seeded` (training continues the same random stream)."""
    if config.task_type == "CAUSAL_LM" and task.is_regression:
        raise OrthomergeError(f"task {task.name!r} is a regression; a causal LM learns labels as completions")
    if config.task_type != "CAUSAL_LM" and task.is_completion:
        raise OrthomergeError(f"task {task.name!r} is a prompt → completion task: train it with task type CAUSAL_LM")
    model = load_model(model_spec, num_labels=task.num_labels, regression=task.is_regression, seed=config.seed,
                       task_type=config.task_type, dtype=dtype, device=resolve_device(device))
    torch.manual_seed(config.seed)
    peft_model = new_peft_model(model, config.targets, config.rank, config.alpha, task_type=config.task_type)
    return peft_model, initialise(peft_model, config, others, own)


def lora_A(peft_model) -> dict[str, torch.Tensor]:
    """A copy of every module's ``A`` (active adapter)."""
    return {m: layer.lora_A[peft_model.active_adapter].weight.detach().cpu().clone()
            for m, layer in lora_layers(peft_model).items()}


def train_adapter(model_spec: str, task: Task, config: TrainConfig,
                  others: list[ActivationStats] | None = None, own: ActivationStats | None = None,
                  progress: bool = True, device=DEFAULT_DEVICE, dtype=DEFAULT_DTYPE) -> LoraAdapter:
    """Fine-tune a LoRA (and the task head, for ``SEQ_CLS``) on ``task.train``; validate after every epoch.
    ``device`` / ``dtype``: where and in which precision the base runs (the LoRA factors stay float32).
    The caller's random state is left as it was."""
    with _seeded(config.seed, device):
        return _train(model_spec, task, config, others, own, progress, device, dtype)


def _train(model_spec, task, config, others, own, progress, device, dtype) -> LoraAdapter:
    """:func:`train_adapter`'s body, inside :func:`_seeded`."""
    config.check()
    if config.needs_stats and not others:
        raise OrthomergeError(f"init {config.init!r} with these options needs the other tasks' statistics")
    started = time.time()
    tokenizer = load_tokenizer(model_spec)
    peft_model, init_meta = _initialised(model_spec, task, config, others, own, device, dtype)
    device = next(peft_model.parameters()).device
    initial_A = lora_A(peft_model)
    constraints = _Constraints(peft_model, config, others)
    constraints.project()
    for name, p in peft_model.named_parameters():
        if (config.freeze == "A" and "lora_A" in name) or (config.freeze == "B" and "lora_B" in name):
            p.requires_grad_(False)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(task.train) / config.batch_size)
    warmup = int(config.warmup * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    order_rng = torch.Generator().manual_seed(config.seed)
    history = []
    bar = tqdm(total=steps, desc=f"train {task.name} ({config.init})", unit="step", disable=not progress)
    for epoch in range(config.epochs):
        peft_model.train()
        order = torch.randperm(len(task.train), generator=order_rng).tolist()
        losses = []
        for batch in _training_batches(task, config, tokenizer, order, device):
            loss = peft_model(**batch).loss + constraints.penalty()
            loss.backward()
            optimiser.step()
            schedule.step()
            optimiser.zero_grad(set_to_none=True)
            constraints.project()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        score = validation_score(peft_model, tokenizer, task, config)
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), f"val_{task.metric}": score})
    bar.close()
    metadata = {
        **init_meta, "task": task.name, "metric": task.metric, "labels": task.label_names,
        "config": asdict(config), "history": history, "train_seconds": round(time.time() - started, 1),
        "model": model_spec, "dtype": str(next(peft_model.get_base_model().parameters()).dtype).replace("torch.", ""),
    }
    adapter = from_peft_model(peft_model.eval(), metadata=metadata)
    adapter.initial_A = initial_A
    return adapter
