"""Spectral rules in factored form at numerical rank: TSV-M, Iso-C, Iso-CTS (docs/merging.md#tsv, #iso_c, #iso_cts).

Every SVD here is the exact thin SVD of a LoRA product from its factors (:func:`factored_svd`), restricted
to the numerical rank: zero singular values are dropped, so no arbitrary null directions enter the merge
(the FusionBench ``iso_c`` pitfall of flattening all min(m, n) values). Weights scale each ΔW_i before the
rule (w_i ΔW_i; a negative weight flips it); ``scale`` is the global coefficient (TSV's α, Iso's λ).
"""
from __future__ import annotations

import torch

from .linear import stack_factors
from .recompress import batched_factored_svd, factored_svd, numerical_rank
from .registry import LowRank, ModuleUpdates, register


def polar(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """Orthogonal polar factor ``P Qᵀ`` of ``x = P S Qᵀ`` (the nearest matrix with orthonormal columns).

    A tall ``x`` (the stacked singular vectors of TSV: m × Σr) goes through its thin QR first: ``x = Q R``
    gives ``polar(x) = Q polar(R)``, an R×R SVD instead of a tall one. ``dtype``: that of the last product
    (default ``x``'s; float32 where the result is written as float32 factors anyway)."""
    dtype = dtype or x.dtype
    if x.shape[-2] > x.shape[-1]:
        q, r = torch.linalg.qr(x)
        return q.to(dtype) @ polar(r, dtype)
    if x.shape[-2] == x.shape[-1] and x.dtype == torch.float64:
        # square: x (xᵀx)^(-1/2) from a symmetric eigendecomposition (cheaper than an SVD), accurate to
        # ~eps·κ(x)², so only while κ(x)² < 1e8 (the SVD below otherwise; always when x is singular)
        w, v = torch.linalg.eigh(x.mT @ x)
        if bool((w[..., 0] > 1e-8 * w[..., -1]).all()):
            return (x @ (v * w.rsqrt().unsqueeze(-2)) @ v.mT).to(dtype)
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return (p @ qh).to(dtype)


def tsv_combine(modules: list[list[tuple]], shape: tuple[int, int], scale: float) -> list[tuple | None]:
    """TSV-M core, per module: its tasks' (U_i, σ_i, V_iᵀ) truncated to ⌊min(m,n)/T⌋ → concat → polar(U),
    polar(V) → ``B = α·U⊥·diag(σ)``, ``A = V⊥ᵀ`` (float32; None for a module whose updates are all zero).
    The polar factors of all modules in one batched call when their concatenations have one width."""
    budget = max(1, min(shape) // len(modules[0]))
    cat = []
    for triplets in modules:
        us, ss, vhs = zip(*[(u[:, :budget], s[:budget], vh[:budget]) for u, s, vh in triplets])
        cat.append((torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)))
    widths = {s.numel() for _, s, _ in cat}
    if len(widths) == 1 and 0 not in widths:
        us, vs = torch.stack([u for u, _, _ in cat]), torch.stack([vh for _, _, vh in cat]).mT
        if us.shape == vs.shape:            # square bases (TSV in the stacked factors' bases): one call for both
            pu, pv = polar(torch.cat([us, vs]), torch.float32).split(len(cat))
        else:
            pu, pv = polar(us, torch.float32), polar(vs, torch.float32)
        pv = pv.mT
        return [(pu[j] * (scale * s).to(torch.float32), pv[j]) for j, (_, s, _) in enumerate(cat)]
    return [(polar(u, torch.float32) * (scale * s).to(torch.float32), polar(vh.T, torch.float32).T)
            if s.numel() else None for u, s, vh in cat]


def _zero(updates) -> LowRank:
    """The all-zero update (rank 1) of a module whose updates sum to zero."""
    m, n = updates.shape
    return LowRank(torch.zeros(m, 1, device=updates.device), torch.zeros(1, n, device=updates.device))


def dense_svd(x: torch.Tensor):
    """Thin SVD of an explicit (small) matrix at numerical rank, float64."""
    u, s, vh = torch.linalg.svd(x.to(torch.float64), full_matrices=False)
    rho = numerical_rank(s, tuple(x.shape))
    return u[:, :rho], s[:rho], vh[:rho]


@register("tsv", space="factored", family="spectral", batched=True,
          summary="TSV-M: per-task singular vectors, decorrelated by polar factors; rank Σr, exact from factors")
def tsv(updates: ModuleUpdates, scale: float = 1.0) -> list[LowRank]:
    """TSV-Merge (Gargiulo et al., CVPR 2025).

    Per task the exact thin SVD of w_i ΔW_i (all r_i triplets fit the budget ⌊min(m,n)/T⌋ for LoRA; only
    the numerical rank is kept); U = [U₁ … U_T], V = [V₁ … V_T], Σ = blockdiag(Σ_i); ``ΔW = α·U⊥ Σ V⊥ᵀ``
    with U⊥, V⊥ the orthogonal polar factors. α = ``scale`` (default 1). Identity: one adapter → itself.
    Batched over modules (see ``register``), and in the bases of the stacked factors: with thin QRs
    ``[B₁' … B_T'] = Q_B R_B`` and ``[A₁; …; A_T]ᵀ = Q_A R_A`` (the two QRs any factored merge needs),
    ``ΔW_i = Q_B (R_B,i R_A,iᵀ) Q_Aᵀ``, so every task's SVD and both polar factors are R-sized
    (``polar(Q_B P) = Q_B polar(P)``); only the two output products are m- and n-sized.
    """
    B, A = stack_factors(updates, updates.weights)                        # [k, m, R], [k, R, n]
    qb, rb = torch.linalg.qr(B.to(torch.float64))
    qa, ra = torch.linalg.qr(A.mT.to(torch.float64))
    shape, k = updates.shape, B.shape[0]
    ends = torch.tensor([a.shape[-2] for _, a in updates.factors]).cumsum(0).tolist()
    cuts = list(zip([0] + ends[:-1], ends))                               # each task's columns of R_B, R_A
    if len({e - s for s, e in cuts}) == 1:                                # one batched SVD of every (task, module)
        flat = batched_factored_svd(torch.cat([rb[..., s:e] for s, e in cuts]),
                                    torch.cat([ra[..., s:e] for s, e in cuts]).mT, shape=shape)
        per_task = [flat[i * k:(i + 1) * k] for i in range(len(cuts))]
    else:
        per_task = [batched_factored_svd(rb[..., s:e], ra[..., s:e].mT, shape=shape) for s, e in cuts]
    combined = tsv_combine([[task[j] for task in per_task] for j in range(k)], shape, scale)
    qb, qa = qb.to(torch.float32), qa.to(torch.float32)
    return [LowRank(qb[j] @ c[0], c[1] @ qa[j].T) if c is not None else _zero(updates)
            for j, c in enumerate(combined)]


def tsv_kernel(updates, scale: float = 1.0) -> torch.Tensor:
    """TSV-M on explicit matrices (Core-Space cores / KnOTS coordinates); budget from their own shape."""
    trip = [dense_svd(updates.full(i) * w) for i, w in enumerate(updates.weights)]
    [combined] = tsv_combine([trip], updates.shape, scale)
    return combined[0] @ combined[1] if combined is not None else torch.zeros(updates.shape, device=updates.device)


@register("iso_c", space="factored", family="spectral", batched=True,
          summary="Iso-C: spectrum of Σ w_i ΔW_i flattened to its mean over the numerical rank only")
def iso_c(updates: ModuleUpdates, scale: float = 1.0) -> list[LowRank]:
    """Iso-C (Marczak et al., ICML 2025): ``ΔW = λ σ̄ U_ρ V_ρᵀ``, σ̄ = mean of the ρ nonzero singular values
    of Σ w_i ΔW_i (ρ = numerical rank ≤ Σr). λ = ``scale`` (default 1; the paper tunes it, e.g. ~1.5 on
    ViT). Not an identity for one adapter unless its spectrum is already flat (it isotropises). Batched
    over modules (see ``register``)."""
    svds = batched_factored_svd(*stack_factors(updates, updates.weights), dtype=torch.float32)
    return [LowRank(u * float(scale * s.mean()), vh) if s.numel() else _zero(updates) for u, s, vh in svds]


@register("iso_cts", space="factored", family="spectral",
          summary="Iso-CTS: common + task-specific subspaces of the numerical rank, polar-orthogonalised, isotropic")
def iso_cts(updates: ModuleUpdates, scale: float = 1.0, common_fraction: float = 0.8) -> LowRank:
    """Iso-CTS (Marczak et al., ICML 2025), budget split as in the paper's code, over ρ not min(m, n).

    ρ = numerical rank of Σ w_i ΔW_i. Common size k = ⌊fraction·ρ⌋, then the task-specific total
    ``round((ρ−k)/T)·T`` and ``k = ρ − that`` (so it splits evenly); common space = top-k singular triplets
    of the sum; task i contributes the top ``(ρ−k)/T`` triplets of ``(I − U_k U_kᵀ) w_i ΔW_i`` (its own
    numerical rank at most). The union of left (right) vectors is orthogonalised by its polar factor and
    every singular value replaced by the mean of the selected ones; × λ (``scale``).
    """
    u, s, vh = factored_svd(*stack_factors(updates, updates.weights))
    rho, t = s.numel(), len(updates)
    if rho == 0:
        return _zero(updates)
    k = int(rho * common_fraction)
    specific = round((rho - k) / t) * t
    k = max(rho - specific, 0)
    per = specific // t
    us, ss, vhs = [u[:, :k]], [s[:k]], [vh[:k]]
    if per > 0:
        uc = u[:, :k]
        for (b, a), w in zip(updates.factors, updates.weights):
            b = b.to(torch.float64) * w
            ui, si, vhi = factored_svd(b - uc @ (uc.T @ b), a)
            us.append(ui[:, :per])
            ss.append(si[:per])
            vhs.append(vhi[:per])
    uu, sv, vv = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    return LowRank(polar(uu, torch.float32) * float(scale * sv.mean()), polar(vv.T, torch.float32).T)
