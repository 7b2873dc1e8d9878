"""Task arithmetic: the exact linear merge in factored form (docs/merging.md#task_arithmetic, #low-rank-algebra)."""
from __future__ import annotations

import torch

from .registry import LowRank, ModuleUpdates, register


def stack_factors(updates: ModuleUpdates, coeffs: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[c₁B₁' … c_TB_T'] , [A₁; …; A_T]`` — ``Σ c_i B_i' A_i`` as one rank-Σr product (PEFT ``cat``);
    for one module, or for k at once (factors with a leading module dimension)."""
    B = torch.cat([b * c for (b, _), c in zip(updates.factors, coeffs)], dim=-1)
    A = torch.cat([a for _, a in updates.factors], dim=-2)
    return B, A


@register("task_arithmetic", space="factored", family="linear", linear=True, batched=True,
          summary="Σ λ·w_i·ΔW_i, exact in factored form (rank Σr, = PEFT 'cat'); λ = scale")
def task_arithmetic(updates: ModuleUpdates, scale: float = 1.0) -> list[LowRank]:
    """``ΔW = λ Σ_i w_i s_i B_i A_i`` written exactly as the concatenated adapter (no dense matrix).

    Weights are per task (default 1: a sum; 1/T averages), λ (``scale``) is global. Identity: one adapter,
    weight 1, λ 1 gives the same ΔW. Batched over modules (see ``register``).
    """
    B, A = stack_factors(updates, [scale * w for w in updates.weights])
    return [LowRank(b, a) for b, a in zip(B, A)]
