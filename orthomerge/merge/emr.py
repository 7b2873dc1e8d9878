"""EMR-Merging (Huang et al., NeurIPS 2024): elect, mask, rescale — one update per task (docs/merging.md#emr).

τ_uni = γ ⊙ max_{i: sign(τ_i) = γ} |τ_i| with γ = sign(Σ_i τ_i) (zero sum → +1); mask M_i = [τ_i ⊙ τ_uni > 0];
rescaler λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni|. Task i runs W₀ + λ_i·M_i ⊙ τ_uni: the result is not one model but
one update per task, so it needs the task identity at inference (the output has a folder per task).

Choices: τ_i = w_i·ΔW_i (weights default 1; EMR itself is tuning-free); ``rescale_scope="model"`` (default,
the reference code: λ_i from sums over all of task i's modules) or ``"module"`` (one λ_i per module).
Dense, streamed in row blocks; identity for one adapter (τ_uni = τ, M = [τ ≠ 0], λ = 1).
"""
from __future__ import annotations

from typing import Literal

import torch

from .elementwise import block_rows
from .registry import Dense, Finalized, MergeContext, ModuleUpdates, PerTask, register


def rescalers(ctx: MergeContext, info: dict) -> Finalized:
    """``finalize`` hook: λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni| from each module's shares (``info[module]`` =
    (numerators, denominators) per task), summed over the model or kept per module (``rescale_scope``)."""
    count = len(ctx.adapters)
    numer, denom = [0.0] * count, [0.0] * count
    for m in ctx.modules:
        for i in range(count):
            numer[i] += info[m][0][i]
            denom[i] += info[m][1][i]
    model = [nu / de if de > 0 else 1.0 for nu, de in zip(numer, denom)]
    if ctx.params["rescale_scope"] == "model":
        scales = {m: model for m in ctx.modules}
    else:
        scales = {m: [nu / de if de > 0 else 1.0 for nu, de in zip(*info[m])] for m in ctx.modules}
    return Finalized(scales, {"rescalers": dict(zip(ctx.names, model))})


@register("emr", space="dense", family="multitask", per_task=True, finalize=rescalers,
          summary="EMR-Merging: unified update + per-task masks and rescalers (one adapter per task)")
def emr(updates: ModuleUpdates, rescale_scope: Literal["model", "module"] = "model") -> PerTask:
    """Per-task masked updates of one module, and this module's shares of each task's rescaler."""
    m, n = updates.shape
    t = len(updates)
    uni = torch.empty(m, n, device=updates.device)
    masks = [torch.empty(m, n, dtype=torch.bool, device=updates.device) for _ in range(t)]
    numer = [0.0] * t
    denom = [0.0] * t
    step = block_rows(n)
    for start in range(0, m, step):
        stop = min(start + step, m)
        tau = torch.stack([updates.rows(i, start, stop) * w for i, w in enumerate(updates.weights)])
        gamma = torch.where(tau.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(tau) == gamma
        u = gamma * (tau.abs() * agree).amax(0)
        uni[start:stop] = u
        for i in range(t):
            mask = tau[i] * u > 0
            masks[i][start:stop] = mask
            numer[i] += float(tau[i].abs().sum(dtype=torch.float64))
            denom[i] += float((u.abs() * mask).sum(dtype=torch.float64))
    return PerTask([Dense(uni * mk) for mk in masks], info=(numer, denom))
