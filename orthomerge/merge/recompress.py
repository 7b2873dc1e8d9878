"""Exact low-rank algebra on factors (docs/merging.md#low-rank-algebra) and re-compression with a reported error.

* :func:`factored_svd` — exact thin SVD of ``B @ A`` from thin QRs of both factors and an R×R SVD
  (O((m+n)R²), no dense matrix), restricted to the **numerical rank** ρ = #{σ_j > tol·σ₁} with
  ``tol = max(m, n)·eps(float32)`` (numpy ``matrix_rank``'s default for float32 data). Zero singular
  values are dropped, never flattened or kept with arbitrary vectors.
* :func:`recompress_factors` — exact truncation to rank k; Σ goes into B (PEFT's ``svd`` convention:
  ``B' = U_k Σ_k``, ``A' = V_kᵀ``).
* :func:`recompress_dense` — rank-k approximation of a dense (full-rank) update: exact SVD for
  matrices up to ``EXACT_SVD_MAX`` entries (float32 LAPACK), randomized SVD above
  (``torch.svd_lowrank``: 4 power iterations, 10 extra columns, seeded without touching the global RNG). In both cases the reported error is that of the factors as written: ``‖ΔW − B A‖_F``
  accumulated in float64 over row blocks (``‖ΔW‖² − ‖Σ_k‖²`` would be float32 cancellation noise when
  little is discarded).

Factored decompositions run in float64; the dense SVD runs in float32 (never bf16/fp16; docs/merging.md#precision).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import svd_flip

EPS32 = torch.finfo(torch.float32).eps
EXACT_SVD_MAX = 2048 * 2048
OVERSAMPLE = 10   # extra columns of the randomized range finder


@dataclass
class Loss:
    """Re-compression loss of one module: squared Frobenius norms of the discarded part and of ΔW."""

    rank_in: int
    rank_out: int
    err_sq: float = 0.0
    total_sq: float = 0.0
    how: str = "exact"

    @property
    def rel_error(self) -> float:
        return (self.err_sq / self.total_sq) ** 0.5 if self.total_sq > 0 else 0.0

    def as_dict(self) -> dict:
        return {"rank_in": self.rank_in, "rank_out": self.rank_out, "rel_error": self.rel_error,
                "discarded_energy": self.err_sq / self.total_sq if self.total_sq > 0 else 0.0,
                "err_sq": self.err_sq, "total_sq": self.total_sq, "svd": self.how}


def numerical_rank(s: torch.Tensor, shape: tuple[int, int], rtol: float | None = None) -> int:
    """#{σ_j > tol·σ₁}; ``tol`` defaults to ``max(m, n)·eps(float32)``."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    tol = rtol if rtol is not None else max(shape) * EPS32
    return int((s > tol * s[0]).sum())


def orth_basis(x: torch.Tensor, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (sign-fixed) and singular values of a tall matrix ``x`` [m, R], numerical rank only.

    Thin QR then an R×R SVD: ``x = Q R``, ``R = U_r Σ Wᵀ`` ⇒ ``x = (Q U_r) Σ Wᵀ``.
    """
    x = x.to(torch.float64)
    q, r = torch.linalg.qr(x)
    u_r, s, _ = torch.linalg.svd(r)
    rho = numerical_rank(s, tuple(x.shape), rtol)
    return svd_flip(q @ u_r[:, :rho]), s[:rho]


def factored_svd(B: torch.Tensor, A: torch.Tensor, rtol: float | None = None, dtype=torch.float64):
    """Exact thin SVD ``B @ A = U diag(S) Vh`` at numerical rank: returns ``U, S, Vh``.

    The QRs and the R×R SVD run in float64; ``dtype`` is that of the two products forming ``U`` and ``Vh``
    (m×R×ρ and ρ×R×n, the largest GEMMs here): float32 where the caller writes float32 factors anyway."""
    return batched_factored_svd(B[None], A[None], rtol, dtype)[0]


def batched_factored_svd(B: torch.Tensor, A: torch.Tensor, rtol: float | None = None,
                         dtype=torch.float64, shape: tuple[int, int] | None = None) -> list[tuple]:
    """:func:`factored_svd` of each ``B[i] @ A[i]`` (``B`` [k, m, R], ``A`` [k, R, n]): one batched call of
    each LAPACK routine; the products forming ``U`` and ``Vh`` batched too when every item has one
    numerical rank (the usual case), else one item at a time. ``shape``: the (m, n) the numerical rank's
    tolerance refers to, when ``B @ A`` are the coordinates of a larger update (default their own)."""
    B, A = B.to(torch.float64), A.to(torch.float64)
    m, n = shape or (B.shape[1], A.shape[2])
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.mT)
    uk, s, vkh = torch.linalg.svd(rb @ ra.mT)
    qb, uk, vkh, qa = (x.to(dtype) for x in (qb, uk, vkh, qa))
    ranks = [numerical_rank(row, (m, n), rtol) for row in s]
    if len(set(ranks)) == 1:
        rho = ranks[0]
        return list(zip(qb @ uk[..., :rho], s[:, :rho], vkh[:, :rho] @ qa.mT))
    return [(qb[i] @ uk[i, :, :rho], s[i, :rho], vkh[i, :rho] @ qa[i].T) for i, rho in enumerate(ranks)]


def recompress_factors(B: torch.Tensor, A: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, Loss]:
    """Exact rank-``rank`` truncation of ``B @ A`` (Σ in B); unchanged when ``rank`` ≥ the factor rank."""
    r_in = A.shape[0]
    if rank is None or rank >= r_in:
        return B, A, Loss(r_in, r_in)
    u, s, vh = factored_svd(B, A)
    k = min(rank, s.numel())
    loss = Loss(r_in, k, float((s[k:] ** 2).sum()), float((s ** 2).sum()))
    return (u[:, :k] * s[:k]).to(torch.float32), vh[:k].to(torch.float32), loss


def recompress_dense(d: torch.Tensor, rank: int, svd: str = "auto") -> tuple[torch.Tensor, torch.Tensor, Loss]:
    """Best (``exact``) or near-best (``randomized``) rank-``rank`` factors of a dense ``d``, Σ in B."""
    m, n = d.shape
    d = d.to(torch.float32)
    how = svd if svd != "auto" else ("exact" if m * n <= EXACT_SVD_MAX else "randomized")
    k = min(rank, m, n)
    if how == "exact":
        u, s, vh = torch.linalg.svd(d, full_matrices=False)      # float32 (LAPACK gesdd), thin
        rho = numerical_rank(s, (m, n))
        k = min(k, rho)
        B, A = u[:, :k] * s[:k], vh[:k]
    elif how == "randomized":   # Halko et al.: 4 power iterations, 10 extra columns, a fixed seed
        with torch.random.fork_rng(devices=[d.device] if d.is_cuda else []):   # the caller's RNG is left as it was
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(d, q=min(k + OVERSAMPLE, m, n), niter=4)
        rho = numerical_rank(s, (m, n))
        k = min(k, rho)
        B, A = u[:, :k] * s[:k], v[:, :k].T
    else:
        raise ValueError(f"svd={svd!r}")
    B, A = B.to(torch.float32), A.to(torch.float32)
    err, total = residual_sq(d, B, A)
    return B, A, Loss(min(m, n), k, err, total, how)


def residual_sq(d: torch.Tensor, B: torch.Tensor, A: torch.Tensor, block_elements: int = 1 << 18) -> tuple[float, float]:
    """``(‖d − B A‖²_F, ‖d‖²_F)`` in float64, a block of about ``block_elements`` entries at a time: one float64
    block in memory (2 MB), never a float64 copy of ``d``."""
    a = A.to(torch.float64)
    err = total = 0.0
    step = max(1, block_elements // max(d.shape[1], 1))
    for start in range(0, d.shape[0], step):
        rows = d[start:start + step].to(torch.float64, copy=True).contiguous()
        flat = rows.view(-1)
        total += float(flat @ flat)
        rows.addmm_(B[start:start + step].to(torch.float64), a, alpha=-1)
        err += float(flat @ flat)
    return err, total
