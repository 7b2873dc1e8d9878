"""Merging in an aligned basis: Core-Space (``core_*``) and KnOTS (``knots_*``) variants of TA/TIES/DARE/TSV.

Both write every task's update in a shared orthonormal basis computed from the factors alone (no dense
ΔW), run the base rule's kernel on the small coordinate matrices, and map back — the output is an exact
low-rank adapter, no re-compression loss. Linear rules give exactly the full-space result; element-wise
rules give *new* methods (they depend on the basis), so they are registered under their own names and
never substituted for the dense-space ones (docs/merging.md#element-wise-rules-need-a-basis).

**Core-Space** (Panariello et al., NeurIPS 2025): U_B = left singular vectors of B_stack = [B₁' … B_T']
(m×R), V_A = right singular vectors of A_stack = [A₁; …; A_T] (R×n); cores M_i = U_Bᵀ B_i' A_i V_A;
ΔW = U_B · rule(M_i) · V_Aᵀ. Here B_i' carries the LoRA scale s_i (not the weight w_i, which the rule
applies); both bases are cut to their numerical rank.

**KnOTS** (Stoica et al., ICLR 2025): [ΔW₁ … ΔW_T] = U Σ [V₁ᵀ … V_Tᵀ]; ΔW = U Σ · rule(V_iᵀ). Computed
from QR of B_c = [B₁' … B_T'], QR of each A_iᵀ and one R×R SVD (docs/merging.md#core-space-and-knots), at numerical rank.

Signs: every singular basis is sign-fixed (largest-|·| entry of each left vector positive), so element-wise
results are deterministic. Trim scope is per coordinate matrix (one threshold per task and module).
"""
from __future__ import annotations

import functools

import torch

from .elementwise import dare_linear_kernel, dare_ties_kernel, magnitude_prune_kernel, ta_kernel, ties_kernel
from ..linalg import svd_flip
from .recompress import numerical_rank, orth_basis
from .registry import DenseUpdates, LowRank, ModuleUpdates, register
from .spectral import tsv_kernel


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def core_coords(updates: ModuleUpdates):
    """``U_B`` [m, ρ_B], ``V_A`` [n, ρ_A] (float64) and the cores ``M_i`` [ρ_B, ρ_A]."""
    ub, _ = orth_basis(torch.cat([b for b, _ in updates.factors], 1))
    va, _ = orth_basis(torch.cat([a for _, a in updates.factors], 0).T)
    cores = [(ub.T @ _f64(b)) @ (_f64(a) @ va) for b, a in updates.factors]
    return ub, va, cores


def knots_coords(updates: ModuleUpdates):
    """``U`` [m, ρ], ``σ`` [ρ] and the per-task coordinates ``V_iᵀ`` [ρ, n] with ΔW_i = U diag(σ) V_iᵀ."""
    qb, rb = torch.linalg.qr(torch.cat([_f64(b) for b, _ in updates.factors], 1))
    qrs = [torch.linalg.qr(_f64(a).T) for _, a in updates.factors]
    offsets, blocks = 0, []
    for q, r in qrs:
        blocks.append(slice(offsets, offsets + r.shape[0]))
        offsets += r.shape[0]
    k = torch.cat([rb[:, blk] @ r.T for blk, (_, r) in zip(blocks, qrs)], 1)
    uk, s, wh = torch.linalg.svd(k)
    rho = numerical_rank(s, updates.shape)
    u, wh = svd_flip(qb @ uk[:, :rho], wh[:rho])
    coords = [wh[:, blk] @ q.T for blk, (q, _) in zip(blocks, qrs)]
    return u, s[:rho], coords


def _tasks(updates: ModuleUpdates, mats) -> DenseUpdates:
    return DenseUpdates([m.to(torch.float32) for m in mats], updates.weights, updates.seeds, updates.name)


def core_merge(updates: ModuleUpdates, kernel, **params) -> LowRank:
    ub, va, cores = core_coords(updates)
    merged = _f64(kernel(_tasks(updates, cores), **params))
    return LowRank((ub @ merged).to(torch.float32), va.T.to(torch.float32).contiguous())


def knots_merge(updates: ModuleUpdates, kernel, **params) -> LowRank:
    u, s, coords = knots_coords(updates)
    merged = kernel(_tasks(updates, coords), **params)
    return LowRank((u * s).to(torch.float32), merged.to(torch.float32).contiguous())


RULES = {
    # base name: (kernel, random, linear); a variant's hyper-parameters are its kernel's
    "task_arithmetic": (ta_kernel, False, True),
    "ties": (ties_kernel, False, False),
    "magnitude_prune": (magnitude_prune_kernel, False, False),
    "dare_linear": (dare_linear_kernel, True, False),
    "dare_ties": (dare_ties_kernel, True, False),
    "tsv": (tsv_kernel, False, False),
}
SPACE_MERGE = {"core": (core_merge, "Core-Space (R×R cores of SVD bases of the stacked factors)"),
               "knots": (knots_merge, "KnOTS (per-task V_i of the SVD of the concatenated updates)")}


def _make(merge, kernel):
    @functools.wraps(kernel)   # the kernel's typed signature is the variant's (see registry)
    def method(updates: ModuleUpdates, **params) -> LowRank:
        return merge(updates, kernel, **params)
    return method


for _space, (_merge, _where) in SPACE_MERGE.items():
    for _base, (_kernel, _random, _linear) in RULES.items():
        _fn = _make(_merge, _kernel)
        _fn.__name__ = f"{_space}_{_base}"
        _fn.__doc__ = f"{_base} applied in {_where}; exact low-rank output."
        register(f"{_space}_{_base}", space=_space, family="subspace", base=_base, random=_random, linear=_linear,
                 summary=f"{_base} in {_where.split(' (')[0]} coordinates; exact low-rank output")(_fn)
