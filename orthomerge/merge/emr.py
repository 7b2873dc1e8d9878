"""EMR-Merging (Huang et al., NeurIPS 2024): elect, mask, rescale — one update per task (docs/merging.md#emr).

τ_uni = γ ⊙ max_{i: sign(τ_i) = γ} |τ_i| with γ = sign(Σ_i τ_i) (zero sum → +1); mask M_i = [τ_i ⊙ τ_uni > 0];
rescaler λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni|. Task i runs W₀ + λ_i·M_i ⊙ τ_uni: the result is not one model but
one update per task, so it needs the task identity at inference (the output has a folder per task).

Choices: τ_i = w_i·ΔW_i (weights default 1; EMR itself is tuning-free); ``rescale_scope="model"`` (default,
the reference code: λ_i from sums over all of task i's modules) or ``"module"`` (one λ_i per module).
Dense, streamed in row blocks; identity for one adapter (τ_uni = τ, M = [τ ≠ 0], λ = 1).
"""
from __future__ import annotations

import torch

from .elementwise import block_rows
from .registry import Dense, ModuleTask, PerTask, register


@register("emr", space="dense", family="multitask", per_task=True, defaults={"rescale_scope": "model"},
          summary="EMR-Merging: unified update + per-task masks and rescalers (one adapter per task)")
def emr(task: ModuleTask, rescale_scope: str = "model") -> PerTask:
    m, n = task.shape
    t = len(task)
    uni = torch.empty(m, n)
    masks = [torch.empty(m, n, dtype=torch.bool) for _ in range(t)]
    numer = [0.0] * t
    denom = [0.0] * t
    step = block_rows(n)
    for start in range(0, m, step):
        stop = min(start + step, m)
        tau = torch.stack([task.rows(i, start, stop) * w for i, w in enumerate(task.weights)])
        gamma = torch.where(tau.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(tau) == gamma
        u = gamma * (tau.abs() * agree).amax(0)
        uni[start:stop] = u
        for i in range(t):
            mask = tau[i] * u > 0
            masks[i][start:stop] = mask
            numer[i] += float(tau[i].abs().sum(dtype=torch.float64))
            denom[i] += float((u.abs() * mask).sum(dtype=torch.float64))
    return PerTask([Dense(uni * mk) for mk in masks], numer, denom)
