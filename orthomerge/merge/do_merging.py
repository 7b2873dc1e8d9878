"""DO-Merging (Zheng et al., "Decouple and Orthogonalize: A Data-Free Framework for LoRA Merging",
arXiv 2505.15875), in factored form (docs/merging.md#do_merging).

docs/merging.md#do_merging flags the losses as "verify against the paper"; this is the summarised form, implemented exactly
as stated here. Per module, with scale-folded factors B_i' (m×r_i), A_i (r_i×n):

1. **Orthogonalise** (data-free, a few gradient steps). On factors normalised to unit Frobenius norm
   (Ã_i = A_i/‖A_i‖, B̃_i = B_i'/‖B_i'‖ — ours, so that γ and the step do not depend on the adapters'
   scale), find perturbations δ minimising

       L_A = Σ_{i≠j} ‖(Ã_i+δ_i)(Ã_j+δ_j)ᵀ‖²_F + γ Σ_i ‖δ_i‖²_F      (r_i×r_j cross-Grams of the rows)
       L_B = Σ_{i≠j} ‖(B̃_i+δ_i)ᵀ(B̃_j+δ_j)‖²_F + γ Σ_i ‖δ_i‖²_F      (likewise for the columns of B)

   by ``steps`` plain gradient steps of size ``lr / (4 Σ_j‖X̂_j‖²_F + 2γ)`` (``lr`` = 1 is a safe fraction
   of the inverse Lipschitz bound), from δ = 0; then Â_i = ‖A_i‖(Ã_i+δ_i), B̂_i likewise. The gradient is
   closed-form: 4·(off-diagonal blocks of X̂X̂ᵀ)·X̂ + 2γδ, an O(R²n) product.
2. **Decouple and merge.** Ŵ_i = B̂_i Â_i splits into magnitudes μ_i (norm of every row — one per output
   unit, as PEFT's DoRA — or of every column with ``magnitude="column"``) and unit directions D_i = Ŵ_i/μ_i.
   Magnitudes are averaged (μ̄ = mean_i μ_i) and directions summed with the task weights:

       ΔW = λ · μ̄ ⊙ Σ_i w_i D_i = λ Σ_i w_i diag(μ̄/μ_i) B̂_i Â_i           (``direction="sum"``)

   or the summed direction is renormalised to unit rows/columns first (``direction="normalize"``).
   Both stay exact low rank (a row/column rescaling of a rank-Σr product; the norms come from r×r Grams).

Uncertain against the paper (not checked, no access): the exact norm in the orthogonality loss (squared
Frobenius here), whether the factors are normalised, γ/step/steps values (ours: γ = 1, 100 steps), the
magnitude axis and how the two merged parts are combined (mean magnitude × summed direction here).
Acting on A and B separately is gauge-dependent (B A = (B G)(G⁻¹A)), a property of the method, not a
bug. λ = ``scale`` multiplies the result (linear: the experiment sweeps it). Identity: one adapter → itself.
"""
from __future__ import annotations

from typing import Literal

import torch

from ..errors import OrthomergeError
from .registry import LowRank, ModuleUpdates, register


def _off_blocks(sizes: list[int], device=None) -> torch.Tensor:
    """R×R mask, 1 off the diagonal blocks of the given sizes."""
    owner = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return (owner[:, None] != owner[None, :]).to(torch.float64)


def orthogonalise(rows: list[torch.Tensor], gamma: float, steps: int, lr: float) -> list[torch.Tensor]:
    """Gradient descent on Σ_{i≠j}‖X̂_i X̂_jᵀ‖² + γΣ‖δ_i‖² over row blocks X_i (r_i×d), normalised to unit
    Frobenius norm during the descent and scaled back. Returns the perturbed blocks (float64)."""
    norms = [float(x.norm()) for x in rows]
    sizes = [x.shape[0] for x in rows]
    base = torch.cat([x.to(torch.float64) / n if n > 0 else x.to(torch.float64) for x, n in zip(rows, norms)], 0)
    mask = _off_blocks(sizes, base.device)
    delta = torch.zeros_like(base)
    for _ in range(steps):
        x = base + delta
        grad = 4.0 * ((x @ x.T) * mask) @ x + 2.0 * gamma * delta
        delta = delta - lr / (4.0 * float((x * x).sum()) + 2.0 * gamma) * grad
    out = base + delta
    return [blk * n for blk, n in zip(torch.split(out, sizes, 0), norms)]


def _axis_norms(b: torch.Tensor, a: torch.Tensor, axis: str) -> torch.Tensor:
    """Row (``b`` side) or column norms of ``b @ a`` from an r×r Gram, never the dense product."""
    if axis == "row":
        return ((b @ (a @ a.T)) * b).sum(1).clamp(min=0).sqrt()
    return ((a.T @ (b.T @ b)) * a.T).sum(1).clamp(min=0).sqrt()


def _rescale(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, axis: str):
    return (b * c[:, None], a) if axis == "row" else (b, a * c[None, :])


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


@register("do_merging", space="factored", family="orthogonal",
          summary="DO-Merging: orthogonalise factors by a few data-free gradient steps, then merge "
                  "magnitudes (mean) and directions (weighted sum) separately; rank Σr, exact")
def do_merging(updates: ModuleUpdates, scale: float = 1.0, gamma: float = 1.0, steps: int = 100, lr: float = 1.0,
               magnitude: Literal["row", "column"] = "row", direction: Literal["sum", "normalize"] = "sum") -> LowRank:
    """DO-Merging for one module (see the module docstring for the exact rule)."""
    if gamma < 0 or steps < 0 or lr <= 0:
        raise OrthomergeError(f"do_merging: need gamma ≥ 0, steps ≥ 0, lr > 0 (got {gamma}, {steps}, {lr})")
    a_hat = orthogonalise([a for _, a in updates.factors], gamma, int(steps), lr)
    b_hat = [b.T for b in orthogonalise([b.T for b, _ in updates.factors], gamma, int(steps), lr)]
    mags = [_axis_norms(b, a, magnitude) for b, a in zip(b_hat, a_hat)]
    mean = torch.stack(mags).mean(0)
    ones = torch.ones_like(mean)
    dirs = [_rescale(b * w, a, _ratio(ones, mu), magnitude) for b, a, mu, w in zip(b_hat, a_hat, mags, updates.weights)]
    B = torch.cat([b for b, _ in dirs], 1)          # Σ_i w_i D_i as one rank-Σr product
    A = torch.cat([a for _, a in dirs], 0)
    target = mean if direction == "sum" else _ratio(mean, _axis_norms(B, A, magnitude))
    B, A = _rescale(B, A, target, magnitude)
    return LowRank((B * scale).to(torch.float32), A.to(torch.float32))
