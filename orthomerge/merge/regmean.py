"""RegMean in its exact factored form (docs/merging.md#regmean).

RegMean (Jin et al., ICLR 2023) solves, per linear module, min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² with the
off-diagonals of each Gram G_i = X_iᵀX_i shrunk by α::

    W = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹,   G̃_i = α·G_i + (1−α)·diag(G_i)

With W_i = W₀ + ΔW_i the base term cancels, so ``ΔW = Σ_i s_i B_i [A_i G̃_i (Σ_j G̃_j)⁻¹]``: a rank-Σr
adapter with new A'_i, computed by a Cholesky solve against the symmetric Σ G̃ (n×n, float64), never an
explicit inverse; if it is not positive definite, ε·mean(diag)·I is added with growing ε.

Choices (options, defaults named):

* ``alpha`` — off-diagonal shrink, default **0.9** (RegMean's range 0.9–0.95; FusionBench uses 0.95).
* ``gram`` — ``"sum"`` (default, RegMean's definition: G_i = Σ_tokens x xᵀ, tasks weighted by token
  count) or ``"mean"`` (G_i / N_i: every task weighted equally whatever its token count). Identical when
  the counts match.
* weights w_i multiply the (shrunk) Gram of task i — its importance in the regression objective — so
  only their ratios matter; ``scale`` (λ) multiplies the merged update.
* Statistics are whatever the user supplies; OSRM's statistics come from the *pre-trained* model, while
  RegMean's definition uses each fine-tuned model's inputs: reusing them is an approximation, exact only
  at the first adapted layer.
* Non-LoRA parameters (heads) are never merged: each task keeps its own head (API policy).
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from ..errors import OrthomergeError
from .registry import LowRank, ModuleUpdates, register


def shrink(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α·G + (1−α)·diag(G)``: off-diagonal entries scaled by α, the diagonal kept."""
    g = g.to(torch.float64)
    return alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))


def cholesky_jitter(s: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of ``s``; adds ε·mean(diag)·I (ε = 1e-10 … 1e-2) if ``s`` is not positive definite."""
    chol, info = torch.linalg.cholesky_ex(s)
    if int(info) == 0:
        return chol
    scale = float(torch.diagonal(s).mean().abs()) or 1.0
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    for eps in (1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        chol, info = torch.linalg.cholesky_ex(s + eps * scale * eye)
        if int(info) == 0:
            return chol
    raise OrthomergeError("regmean: the summed Gram matrix is not positive definite even with jitter")


def regmean_factors(factors, grams, weights, alpha=0.9, gram="sum", tokens=None):
    """New factors ``(B_i', A'_i)`` with ``A'_i = A_i G̃_i (Σ_j G̃_j)⁻¹``; float32 results."""
    if gram not in ("sum", "mean"):
        raise OrthomergeError(f"regmean gram={gram!r}: choose sum or mean")
    if not 0.0 <= alpha <= 1.0:
        raise OrthomergeError(f"regmean alpha {alpha} is outside [0, 1]")
    if any(w <= 0 for w in weights):
        raise OrthomergeError("regmean: weights scale each task's Gram matrix and must be positive")
    gt = []
    for i, g in enumerate(grams):
        g = shrink(g, alpha)
        if gram == "mean":
            if not tokens or tokens[i] <= 0:
                raise OrthomergeError("regmean gram='mean' needs the token count of every task")
            g = g / tokens[i]
        gt.append(g * weights[i])
    chol = cholesky_jitter(sum(gt))
    out = []
    for (b, a), g in zip(factors, gt):
        rhs = g @ a.to(torch.float64).T          # G̃_i A_iᵀ  (Σ G̃ symmetric ⇒ A_i G̃_i S⁻¹ = (S⁻¹ G̃_i A_iᵀ)ᵀ)
        out.append((b, torch.cholesky_solve(rhs, chol).T.to(torch.float32)))
    return out


@register("regmean", space="factored", family="data", needs_stats=True,
          summary="RegMean, exact factored form A_i' = A_i G̃_i (Σ G̃)⁻¹ (rank Σr); needs per-module Gram stats")
def regmean(updates: ModuleUpdates, alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9,
            gram: Literal["sum", "mean"] = "sum", scale: float = 1.0) -> LowRank:
    """RegMean on the LoRA factors; identity for one adapter (A' = A G̃ G̃⁻¹ = A)."""
    if updates.grams is None:
        raise OrthomergeError(f"regmean: no Gram matrices for module {updates.name}")
    new = regmean_factors(updates.factors, updates.grams, updates.weights, alpha, gram, updates.tokens)
    B = torch.cat([b * scale for b, _ in new], 1)
    A = torch.cat([a for _, a in new], 0)
    return LowRank(B, A)
