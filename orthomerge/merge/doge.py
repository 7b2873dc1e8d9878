"""DOGE (Wei et al., "Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent", ICML 2025,
arXiv 2501.01230; FusionBench ``doge_ta``) on dense ΔW (docs/merging.md#doge).

Data-free refinement of a task-arithmetic merge. Per module, with τ_i = ΔW_i (m×n) and training-free
task-aware coefficients λ_i = w_i · ``lamda`` · ν / ‖τ_i‖_F (ν = mean_i ‖τ_i‖_F), a shared modification
δ (m×n, from 0) minimises each task's first-order gap to its expert, the reference code's

    L(δ) = Σ_j Σ_rows ( ⟨τ_j[r], τ_j[r] − M[r]⟩ )²,      M = Σ_i λ_i τ_i + (Σ_i λ_i) δ

by Adam (``steps`` = 400 as in the code), each gradient projected off the shared subspace,
g ← g − U_k U_kᵀ g: U_k = the top-k left singular vectors of [U_1 … U_T], U_i = task i's top
⌊min(m,n)/T⌋ left singular vectors, k = ⌊ρ/``subspace``⌋ (``subspace`` = 6 as in the code). Then each
task vector is masked to its top ``density`` entries by |τ_i| (K = 30 % in the code) and

    ΔW = λ_out · Σ_i λ_i (τ_i + δ) ⊙ M_i                                      (λ_out = ``scale``)

What differs from the reference code (FusionBench ``DOGE_TA_Algorithm``), and why:

* λ_i is relative: the code's absolute ``lamda / ‖τ_i‖`` (0.07 for CLIP ViT-B/32) becomes
  ``lamda · ν / ‖τ_i‖``, so ``lamda`` = 1 keeps the average norm and one adapter is returned unchanged;
  ``scale`` multiplies the result after the optimisation (linear, the experiment's λ sweep; the code has
  no such outer factor, its λ enters the loss — set ``lamda`` to do that).
* Spectral budgets at numerical rank (docs/merging.md#spectral-budgets-at-numerical-rank): U_i has ρ_i ≤ r_i columns for a LoRA, and
  k is the fraction 1/``subspace`` of the union's numerical rank ρ (the code: of min(m, n), which is the
  union's size for full fine-tunes).
* Adam runs in units of the task vectors' RMS entry (step ``lr`` = 0.1 RMS; the code's absolute 1e-4 has no
  meaning across models); the gradient is the closed form −2(Σλ_i) Σ_j e_j ⊙ τ_j. The code projects the
  gradient only, and Adam's element-wise scaling then leaks its step back into the shared subspace; here
  the step is projected too, so δ stays exactly off the subspace (the paper's constraint).
* Masking: ``trim_scope="model"`` (default; the code's one threshold per task over all its weights, computed
  exactly by the ``prepare`` hook shared with TIES) or ``"tensor"``; a direct call without thresholds trims per tensor. ``density`` = 1
  keeps everything. Weights w_i scale λ_i (a negative weight flips its task; the gap objective still pulls
  towards every expert). Dense in m×n per module (δ and the masks are dense by definition).
"""
from __future__ import annotations

import torch

from ..errors import OrthomergeError
from .elementwise import TrimScope, check_density, prepare_trim_scope, trim_threshold
from .recompress import factored_svd, orth_basis
from .registry import Dense, Density, ModuleUpdates, broadcast, register


def shared_basis(updates: ModuleUpdates, subspace: float) -> torch.Tensor:
    """U_k (m×k, float64): the most shared directions of the tasks' top left singular vectors."""
    m, n = updates.shape
    budget = max(1, min(m, n) // len(updates))
    us = [factored_svd(b, a)[0][:, :budget] for b, a in updates.factors]
    stacked = torch.cat(us, 1)
    if stacked.shape[1] == 0:
        return stacked
    u, _ = orth_basis(stacked)
    return u[:, :int(u.shape[1] // subspace)]


def refine(taus: list[torch.Tensor], lambdas: list[float], basis: torch.Tensor, steps: int, lr: float,
           history: list | None = None) -> torch.Tensor:
    """δ after ``steps`` Adam steps on L with projected gradients (float64; same units as ``taus``)."""
    rms = float(torch.stack([(t * t).mean() for t in taus]).mean().sqrt())
    if rms == 0 or steps == 0:
        return torch.zeros_like(taus[0])
    ts = [t / rms for t in taus]
    c = sum(lambdas)
    fixed = sum(l * t for l, t in zip(lambdas, ts))
    delta = torch.zeros_like(ts[0], requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=lr, betas=(0.9, 0.999), eps=1e-8)

    def off_subspace(x: torch.Tensor) -> torch.Tensor:
        return x - basis @ (basis.T @ x) if basis.shape[1] else x

    for _ in range(steps):
        with torch.no_grad():
            merged = fixed + c * delta
            errors = [(t * (t - merged)).sum(1, keepdim=True) for t in ts]
            if history is not None:
                history.append(float(sum((e ** 2).sum() for e in errors)) * rms ** 4)
            delta.grad = off_subspace(-2.0 * c * sum(e * t for e, t in zip(errors, ts)))   # closed form
        optimiser.step()
        with torch.no_grad():   # Adam's element-wise scaling would leak the step back into the subspace
            delta.copy_(off_subspace(delta))
    return delta.detach() * rms


@register("doge", space="dense", family="projective", prepare=prepare_trim_scope,
          summary="DOGE: task-arithmetic merge refined by projected gradient descent on each task's gap "
                  "to its expert, norm-aware coefficients, top-k masks; dense")
def doge(updates: ModuleUpdates, scale: float = 1.0, lamda: float = 1.0, density: Density = 0.3, subspace: float = 6.0,
         steps: int = 400, lr: float = 0.1, trim_scope: TrimScope = "model") -> Dense:
    """DOGE for one module; identity for one adapter at density 1 (λ = 1, the gap is 0 at δ = 0)."""
    if subspace < 1 or steps < 0 or lr <= 0:
        raise OrthomergeError(f"doge: need subspace ≥ 1, steps ≥ 0, lr > 0 (got {subspace}, {steps}, {lr})")
    dens = broadcast(density, len(updates), "density")
    thresholds = (updates.extras or {}).get("thresholds")   # model scope: from prepare_trim_scope
    check_density(dens)
    taus = [b.to(torch.float64) @ a.to(torch.float64) for b, a in updates.factors]
    norms = [float(t.norm()) for t in taus]
    nu = sum(norms) / len(norms)
    lambdas = [w * lamda * nu / n if n > 0 else 0.0 for w, n in zip(updates.weights, norms)]
    delta = refine(taus, lambdas, shared_basis(updates, subspace), int(steps), lr)
    masks = []   # on the float32 ΔW_i, as the API's model-scope thresholds are computed
    for i, (b, a) in enumerate(updates.factors):
        t32 = b.to(torch.float32) @ a.to(torch.float32)
        th = thresholds[i] if thresholds is not None else trim_threshold(t32.clone(), dens[i])
        masks.append(t32.abs() >= th)
    out = sum(l * (t + delta) * mk for l, t, mk in zip(lambdas, taus, masks))
    return Dense((scale * out).to(torch.float32))
