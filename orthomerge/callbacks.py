"""Keep a LoRA's ``A`` low-interference inside any transformers ``Trainer`` (yours or orthomerge's).

Both pieces are built from the other tasks' statistics (:class:`~orthomerge.stats.ActivationStats`) and
the PEFT model being trained; OSRM itself is the in-memory init :func:`orthomerge.osrm.init_peft_model_osrm`.

* :class:`SubspaceProjection` — a ``TrainerCallback``: each ``A`` is projected onto the ``k`` directions
  the other tasks use least (the smallest eigenvectors of ``S_¬t``) at train begin and after every
  optimiser step, so ``A`` may rotate within that subspace but never leave it.
* :class:`InterferenceRegulariser` + :class:`InterferenceLoss` — the loss term
  ``μ · Σ_modules tr(A S_¬t Aᵀ) / tr(A Aᵀ)`` (``S_¬t`` divided by its mean eigenvalue, so ``μ`` does not
  depend on the activations' scale) and a ``Trainer`` mixin that adds it to the training loss. A mixin and
  not ``compute_loss_func``: that hook sees only the outputs and labels, not the model's ``A``.

Under ``torchrun`` / ``accelerate launch`` (DDP) every process holds the same ``A``, so each projects and
penalises identically; no distributed code is needed here.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from .adapters import lora_layers
from .errors import OrthomergeError
from .osrm import other_second_moment, smallest_eigenvectors


def _other_moments(peft_model, others, what: str) -> dict[str, np.ndarray]:
    """``S_¬t`` (float64) for every LoRA module of ``peft_model``'s active adapter."""
    layers = lora_layers(peft_model)
    if not layers:
        raise OrthomergeError(f"{what}: the model has no LoRA layers")
    if not others:
        raise OrthomergeError(f"{what} needs the other tasks' statistics")
    return {m: other_second_moment(others, m) for m in layers}


def _lora_A(layer, name: str) -> torch.nn.Parameter:
    return layer.lora_A[name].weight


class SubspaceProjection(TrainerCallback):
    """Project every ``A`` onto its ``k`` lowest-interference input directions (``k ≥ r``) at train begin
    and after each optimiser step: ``A ← A U Uᵀ`` with ``U`` the ``k`` smallest eigenvectors of ``S_¬t``.

    ``Trainer(..., callbacks=[SubspaceProjection(peft_model, others, k=64)])``."""

    def __init__(self, peft_model, others, k: int):
        moments = _other_moments(peft_model, others, "subspace projection")
        self.name = peft_model.active_adapter
        self.layers = lora_layers(peft_model)
        rank = max(_lora_A(layer, self.name).shape[0] for layer in self.layers.values())
        if k < rank:
            raise OrthomergeError(f"subspace k={k} must be ≥ the LoRA rank {rank}")
        self.projectors = {}
        for m, moment in moments.items():
            u = torch.from_numpy(smallest_eigenvectors(moment, k)[1].T.copy())
            self.projectors[m] = u @ u.T   # float64 on the CPU; cast to A's device and dtype on first use

    def project(self) -> None:
        """Put each ``A`` back into its subspace."""
        with torch.no_grad():
            for m, p in self.projectors.items():
                w = _lora_A(self.layers[m], self.name)
                if p.device != w.device or p.dtype != w.dtype:
                    p = self.projectors[m] = p.to(w)
                w.copy_(w @ p)

    def on_train_begin(self, args, state, control, **kwargs):
        self.project()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.project()


def interference_penalty(A: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """tr(A S Aᵀ) / tr(A Aᵀ): the other tasks' mean energy through A, scale-free."""
    return torch.einsum("rn,nm,rm->", A, moment, A) / (A * A).sum()


class InterferenceRegulariser:
    """``weight · Σ_modules tr(A S Aᵀ) / tr(A Aᵀ)`` with ``S = S_¬t / (tr S_¬t / n)`` (its mean eigenvalue
    is 1, so ``weight`` is dimensionless); calling it returns the term as a differentiable scalar."""

    def __init__(self, peft_model, others, weight: float):
        self.name = peft_model.active_adapter
        self.layers = lora_layers(peft_model)
        self.weight = float(weight)
        self.moments = {m: torch.from_numpy(s * len(s) / np.trace(s))
                        for m, s in _other_moments(peft_model, others, "interference regulariser").items()}

    def __call__(self) -> torch.Tensor:
        total = 0.0
        for m, s in self.moments.items():
            a = _lora_A(self.layers[m], self.name)
            if s.device != a.device or s.dtype != a.dtype:
                s = self.moments[m] = s.to(a)
            total = total + interference_penalty(a, s)
        return self.weight * total


class InterferenceLoss:
    """``Trainer`` mixin adding an :class:`InterferenceRegulariser` to the training loss (not to evaluation
    losses): ``class MyTrainer(InterferenceLoss, Trainer): ...``, then ``MyTrainer(..., interference=reg)``.

    The term is added once per optimiser step whatever the gradient accumulation: the Trainer divides a
    per-batch loss by the accumulation steps itself, but not a loss it already normalised over the whole
    accumulated batch (``num_items_in_batch``, e.g. causal LMs), where the term is divided here instead."""

    def __init__(self, *args, interference: InterferenceRegulariser | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.interference = interference

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether the Trainer will *not* divide this loss by the accumulation steps (its training_step rule)."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if self.interference is None or not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        term = self.interference()
        if self._loss_scaled_for_accumulation(num_items_in_batch):
            term = term / self.current_gradient_accumulation_steps
        loss = loss + term.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss


class InterferenceTrainer(InterferenceLoss, Trainer):
    """``transformers.Trainer`` with the ``interference=`` loss term of :class:`InterferenceLoss`."""
