"""Evaluation of single, merged and per-task adapters, and the interference diagnostics.

:class:`TaskEvaluator` keeps one base model per task (each task has its own head size), patches
``W₀ + ΔW`` into the target modules (only while scoring) and the task's head, and scores a split. Patching
the dense weights is exactly the merged model a user would deploy, and it makes λ sweeps cheap (no re-wrapping).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from . import causal, patching
from .adapters import WEIGHTS_NAME, LoraAdapter, validate_adapter
from .config import DEFAULT_DEVICE, DEFAULT_DTYPE, MAX_LENGTH
from .encoding import batches
from .errors import OrthomergeError
from .models import load_model, load_tokenizer, resolve_device, same_model
from .stats import ActivationStats
from .tasks import Split, Task, compute_metric

log = logging.getLogger("orthomerge")
EVAL_BATCH_SIZE = 64   # rows per inference batch


def predict(model: nn.Module, tokenizer, split: Split, max_length: int = MAX_LENGTH,
            batch_size: int = EVAL_BATCH_SIZE) -> list:
    """Class ids (or floats for regression) for every row, batched by length to limit padding."""
    device = next(model.parameters()).device
    return predict_batches(model, batches(tokenizer, split, max_length, batch_size, by_length=True,
                                          device=device), len(split))


def predict_batches(model: nn.Module, encoded: Iterable[tuple[list[int], dict]], rows: int) -> list:
    """:func:`predict` over batches already tokenised and padded (``(row indices, batch)`` pairs)."""
    out = [None] * rows
    model.eval()
    with torch.inference_mode():
        for idx, batch in encoded:
            logits = model(**batch).logits.float()
            preds = logits[:, 0].tolist() if logits.shape[-1] == 1 else logits.argmax(-1).tolist()
            for i, p in zip(idx, preds):
                out[i] = p
    return out


class TaskEvaluator:
    """Scores ``W₀ + ΔW`` (+ a task's head) on a task's split, for any ΔW: single, merged, per-task.

    Each task's model keeps W₀ between calls: ΔW is added only while a split is scored
    (:func:`orthomerge.patching.patched`), so the merge methods may be handed the same model. The heads
    last installed stay (every score installs its own).

    ``task_type="CAUSAL_LM"``: one causal LM serves every task (no heads), and a task is scored by the
    likelihood of each label's completion after the task's prompt (``prompt``: the template, see
    :mod:`orthomerge.causal`; when None, each task's own template or the default). ``device`` / ``dtype``
    place the models."""

    def __init__(self, model_spec: str, tasks: list[Task], max_length: int = MAX_LENGTH,
                 batch_size: int = EVAL_BATCH_SIZE, *, task_type: str = "SEQ_CLS", prompt: str | None = None,
                 device=DEFAULT_DEVICE, dtype=DEFAULT_DTYPE):
        self.spec = model_spec
        self.tasks = {t.name: t for t in tasks}
        self.tokenizer = load_tokenizer(model_spec)
        self.task_type, self.prompt = str(task_type).upper(), prompt or None
        place = dict(device=resolve_device(device), dtype=dtype)
        if self.task_type == "CAUSAL_LM":
            shared = load_model(model_spec, task_type="CAUSAL_LM", **place)
            self.models = {t.name: shared for t in tasks}
        else:
            self.models = {t.name: load_model(model_spec, num_labels=t.num_labels, regression=t.is_regression,
                                              **place) for t in tasks}
        self.max_length, self.batch_size = max_length, batch_size
        self._encoded: dict[tuple[str, str], list] = {}   # (task, split) → its padded batches, made once

    def encoded(self, task: str, split: str) -> list[tuple[list[int], dict]]:
        """A split's rows tokenised, sorted by length and padded into batches on the model's device, once:
        every score of that split (each method, λ and arm) reuses them."""
        if (task, split) not in self._encoded:
            device = next(self.models[task].parameters()).device
            self._encoded[task, split] = list(batches(self.tokenizer, getattr(self.tasks[task], split),
                                                      self.max_length, self.batch_size, by_length=True,
                                                      device=device))
        return self._encoded[task, split]

    def validate(self, adapter: LoraAdapter, task: str) -> None:
        """Refuse (one line) an adapter that does not fit ``task``'s model: a missing or mismatched module,
        or no head of the task's size (a fresh head would score chance and look like a result). A base
        model name that differs from the one evaluated on is a warning."""
        where = adapter.path / WEIGHTS_NAME if adapter.path else adapter.name
        if adapter.has_biases:
            raise OrthomergeError(f"{where}: has biases (lora_bias or bias='lora_only'|'all'), which this "
                                  "evaluator does not apply yet; evaluate it with PEFT (PeftModel.from_pretrained)")
        if not adapter.heads and self.task_type != "CAUSAL_LM":
            raise OrthomergeError(f"{where}: no task head (modules_to_save) for task {task!r}; evaluate the "
                                  "adapter trained with its head, or a merge output's tasks/<name>")
        validate_adapter(adapter, self.models[task], where=where)
        named = adapter.config.get("base_model_name_or_path")
        if named and not same_model(named, self.spec):
            log.warning("%s: adapter was trained on %s, evaluated on %s", where, named, self.spec)

    def with_heads(self, task: str, heads: dict[str, torch.Tensor]) -> nn.Module:
        """The task's model (base weights W₀) with ``heads`` copied into its head."""
        model = self.models[task]
        state = model.state_dict()
        with torch.no_grad():
            for key, value in heads.items():
                if key not in state or state[key].shape != value.shape:
                    raise OrthomergeError(f"head {key!r} does not fit task {task!r} "
                                          f"({self.tasks[task].num_labels} outputs)")
                state[key].copy_(value)
        return model

    @contextlib.contextmanager
    def patched(self, task: str, deltas: dict[str, torch.Tensor], heads: dict[str, torch.Tensor]):
        """The task's model with ``heads`` and ``W₀ + ΔW`` in every module of ``deltas``, for the duration."""
        with patching.patched(self.with_heads(task, heads), deltas) as model:
            yield model

    def score(self, task: str, deltas: dict[str, torch.Tensor], heads: dict[str, torch.Tensor],
              split: str = "test") -> float:
        t = self.tasks[task]
        data: Split = getattr(t, split)
        with self.patched(task, deltas, heads) as model:
            if self.task_type == "CAUSAL_LM":
                return causal.score_split(model, self.tokenizer, data, t.label_names, t.metric,
                                          causal.task_template(t, self.prompt), self.max_length, self.batch_size)
            predictions = predict_batches(model, self.encoded(task, split), len(data))
        return compute_metric(t.metric, predictions, data.labels)


def adapter_deltas(adapter: LoraAdapter, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Dense ``scale · s·B@A`` per module."""
    return {m: adapter.delta(m) * scale for m in adapter.modules}


def output_energy(adapter: LoraAdapter, module: str, gram: torch.Tensor) -> float:
    """‖ΔW Xᵀ‖_F² = tr((A G Aᵀ)(s²BᵀB)) from factors and a Gram matrix, an r×r computation."""
    b, a = adapter.factors(module)
    a, b = a.double(), b.double()
    return float(torch.trace((a @ gram @ a.T) @ (b.T @ b)))


def interference_matrix(adapters: list[LoraAdapter], stats: list[ActivationStats],
                        per_module: bool = False) -> np.ndarray | dict[str, np.ndarray]:
    """R[i, j] = ‖ΔW_j X_iᵀ‖ / ‖ΔW_i X_iᵀ‖ over all modules (task i's inputs ``stats[i]``).

    The diagonal is 1; off-diagonal entries say how much adapter j shifts task i's layer outputs
    relative to task i's own update. ``per_module=True`` returns one matrix per module.
    """
    if len(adapters) != len(stats):
        raise OrthomergeError("one statistics file per adapter is needed for interference")
    modules = adapters[0].modules
    energy = np.zeros((len(modules), len(adapters), len(adapters)))
    for k, m in enumerate(modules):
        for i, st in enumerate(stats):
            gram = st.gram(m)
            for j, ad in enumerate(adapters):
                energy[k, i, j] = output_energy(ad, m, gram)
    if per_module:
        return {m: np.sqrt(e / np.diag(e)[:, None]) for m, e in zip(modules, energy)}
    total = energy.sum(0)
    return np.sqrt(total / np.diag(total)[:, None])


def off_diagonal_mean(matrix) -> float:
    """Mean of the off-diagonal entries (the cross-task part of an interference matrix)."""
    matrix = np.asarray(matrix, dtype=float)
    return float(matrix[~np.eye(len(matrix), dtype=bool)].mean())


def input_energy(A: dict[str, torch.Tensor], stats: ActivationStats) -> float:
    """``Σ_m tr(A S Aᵀ) / Σ_m tr(A Aᵀ)·tr(S)/n``: per-token input energy passing through ``A``, relative to
    a random A of the same norm (expected 1). OSRM makes it small for the *other* tasks' S at init; the
    diagonal (a task's own S) says how much of its own signal the subspace keeps. Scale-free in A."""
    num = den = 0.0
    for m, a in A.items():
        a, moment = a.double(), stats.second_moment(m)
        num += float(torch.einsum("rn,nm,rm->", a, moment, a))
        den += float((a * a).sum() * torch.trace(moment) / moment.shape[0])
    return num / den


def subspace_drift(adapter: LoraAdapter) -> dict | None:
    """How far A moved from its initial row space: mean principal-angle cosine (1 = stayed) and the
    relative change ‖A − A₀‖/‖A₀‖, averaged over modules."""
    if not adapter.initial_A:
        return None
    cosines, changes = [], []
    for m, a0 in adapter.initial_A.items():
        a0, a = a0.double(), adapter.A[m].double()
        q0, _ = torch.linalg.qr(a0.T)
        q1, _ = torch.linalg.qr(a.T)
        cosines.append(float(torch.linalg.svdvals(q0.T @ q1).mean()))
        changes.append(float((a - a0).norm() / a0.norm()))
    return {"mean_cosine": float(np.mean(cosines)), "relative_change": float(np.mean(changes))}
