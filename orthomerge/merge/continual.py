"""Continual merging: OPCM (Tang et al., "Merging Models on the Fly Without Retraining", arXiv 2501.09522,
NeurIPS 2025; FusionBench ``opcm``), per module in factored form (docs/merging.md#continual).

Adapters arrive one at a time. Per linear module, with τ_t = w_t·ΔW_t in arrival order::

    S_1 = τ_1,        S_t = S_{t-1} + P_{t-1}(τ_t)
    P_{t-1}(τ) = τ − U_k (U_kᵀ τ V_k) V_kᵀ − Σ_{k ≤ j < ρ} (u_jᵀ τ v_j) u_j v_jᵀ
    merged after T adapters:  ΔW = λ · S_T · mean_t ‖τ_t‖ / ‖S_T‖

where U diag(σ) Vᵀ is the SVD of S_{t-1} (= of the previous merged update, same vectors), ρ its numerical
rank and ``k = #{j : Σ_{i≤j} σ_i / Σ σ ≤ α}`` (the code's ``split_rank``; α = ``alpha``, default 0.5 as in
FusionBench's ``opcm.yaml``). So a new update loses its components in the "important" block
span(U_k) × span(V_k) of what is already merged and its component along every rank-one direction
u_j v_jᵀ of it. The adaptive scaling is the code's λ_t = ‖S_t‖ / mean_{i≤t}‖τ_i‖ with the merged update
kept at S_t / λ_t, i.e. the final update has the mean norm of the task updates; norms are over every
adapted module (``norm_scope="model"``, the code's whole-model norm) or per module (``"module"``).
``scale`` (λ, default 1) multiplies the result (the experiment's λ sweep).

What is exact and what differs from the reference code (FusionBench ``OPCM.merge_linear_weights``):

* Factored, never dense: S_t is kept as its thin SVD at numerical rank (U m×ρ, σ, V n×ρ); adding τ = B A is
  ``S_t = U (diag σ − M) Vᵀ + B A`` with the ρ×ρ block/diagonal M of Uᵀ τ V, re-factored by thin QRs of the
  stacked factors and one small SVD (:func:`~orthomerge.merge.recompress.factored_svd`). Cost
  O((m+n)(ρ+r)²) per step. Memory is S's factors plus two running numbers (Σ‖τ‖ and the count), so it
  does not grow with the number of merged tasks beyond min(m, n) (``max_rank`` > 0 caps ρ: constant
  memory, then approximate, the discarded energy is reported).
* The code zeroes the diagonal of Uᵀ τ V over all min(m, n) full-SVD vectors; beyond ρ the singular
  values are 0 and u_j, v_j an arbitrary LAPACK basis of the null spaces, so that part depends on the
  library. Here the diagonal is taken over the numerical rank only (identical for full-rank fine-tunes).
* Order: the batch registry method merges in a seeded pseudo-random order by default (``order="shuffle"``,
  FusionBench's default ``shuffle_order: true``) whose keys come from the adapters' contents and the merge
  seed — reproducible and independent of how the list is written, like DARE's masks; ``order="given"``
  merges in list order. :class:`ContinualMerger` is the streaming form (true arrival order).
* Heads and non-LoRA parameters are not merged (API policy). Identity: one adapter gives itself.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from ..errors import OrthomergeError
from .recompress import factored_svd
from .registry import LowRank, MergeContext, ModuleUpdates, Prepared, module_seed, register


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """#{j : cumsum(σ)_j / Σσ ≤ α}: the size of the protected top block (FusionBench's ``split_rank``)."""
    if s.numel() == 0 or float(s.sum()) <= 0:
        return 0
    return int((torch.cumsum(s, 0) / s.sum() <= alpha).sum())


def project_out(state, b: torch.Tensor, a: torch.Tensor, alpha: float):
    """Factors of ``S + P_S(B A)`` for ``S = U diag(σ) Vh`` (``state``), float64; see the module docstring."""
    b, a = b.to(torch.float64), a.to(torch.float64)
    if state is None or state[1].numel() == 0:
        return b, a
    u, s, vh = state
    k = split_rank(s, alpha)
    cross = (u.T @ b) @ (a @ vh.T)                   # Uᵀ τ V, ρ×ρ
    removed = torch.diag(torch.diagonal(cross))
    removed[:k, :k] = cross[:k, :k]
    return torch.cat([u @ (torch.diag(s) - removed), b], 1), torch.cat([vh, a], 0)


class ContinualMerger:
    """Streaming OPCM over the modules of a model: :meth:`add` one update (or adapter) at a time.

    >>> merger = ContinualMerger(alpha=0.5)
    >>> for path in arriving_adapters:          # e.g. as they are published
    ...     merger.add_adapter(load_adapter(path))
    >>> merged = merger.to_adapter()             # scaling-1 LoRA of the current merge

    State per module: the thin SVD of S_t; plus Σ_t‖τ_t‖ and the count (model or per module).
    """

    def __init__(self, alpha: float = 0.5, norm_scope: str = "model", max_rank: int = 0):
        if not 0.0 <= alpha < 1.0:
            raise OrthomergeError(f"continual: alpha={alpha} must be in [0, 1)")
        if norm_scope not in ("model", "module"):
            raise OrthomergeError(f"continual: norm_scope={norm_scope!r}: choose model or module")
        if max_rank < 0:
            raise OrthomergeError(f"continual: max_rank={max_rank} must be ≥ 0 (0 = exact)")
        self.alpha, self.norm_scope, self.max_rank = alpha, norm_scope, int(max_rank)
        self.states: dict[str, tuple] = {}
        self.norm_sum: dict[str, float] = {}   # Σ_t ‖τ_t‖ per module, and "" for the whole model
        self.count = 0
        self.lambdas: list[float] = []         # λ_t after each step (report only)
        self.discarded_sq = 0.0                # energy dropped by max_rank (0 when exact)

    def add(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Merge one task's update, given as scale-folded factors ``(B', A)`` per module."""
        if self.states and set(factors) != set(self.states):
            odd = sorted(set(factors) ^ set(self.states))[0]
            raise OrthomergeError(f"continual: module {odd!r} is not in every adapter")
        total_sq = 0.0
        for m, (b, a) in factors.items():
            b64, a64 = b.to(torch.float64), a.to(torch.float64)
            sq = float(torch.trace((b64.T @ b64) @ (a64 @ a64.T)).clamp(min=0))
            total_sq += sq
            self.norm_sum[m] = self.norm_sum.get(m, 0.0) + math.sqrt(sq)
            u, s, vh = factored_svd(*project_out(self.states.get(m), b64, a64, self.alpha))
            if self.max_rank and s.numel() > self.max_rank:
                self.discarded_sq += float((s[self.max_rank:] ** 2).sum())
                u, s, vh = u[:, :self.max_rank], s[:self.max_rank], vh[:self.max_rank]
            self.states[m] = (u, s, vh)
        self.norm_sum[""] = self.norm_sum.get("", 0.0) + math.sqrt(total_sq)
        self.count += 1
        norm = self._norm("")
        mean = self.norm_sum[""] / self.count
        self.lambdas.append(norm / mean if mean > 0 else 0.0)

    def add_adapter(self, adapter, weight: float = 1.0) -> None:
        """Merge a :class:`~orthomerge.adapters.LoraAdapter` (its scale folded, times ``weight``)."""
        self.add({m: adapter.scaled_factors(m, weight) for m in adapter.modules})

    def _norm(self, module: str) -> float:
        mods = self.states if module == "" else [module]
        return math.sqrt(sum(float((self.states[m][1] ** 2).sum()) for m in mods))

    def multiplier(self, module: str) -> float:
        """mean‖τ‖ / ‖S‖ at the chosen scope (the normalisation that makes the merge S / λ_t)."""
        key = "" if self.norm_scope == "model" else module
        norm = self._norm(key)
        return (self.norm_sum[key] / self.count) / norm if norm > 0 else 0.0

    def delta(self, module: str, scale: float = 1.0) -> LowRank:
        """The current merged update of ``module`` as exact factors (Σ in B), float32."""
        u, s, vh = self.states[module]
        c = scale * self.multiplier(module)
        return LowRank((u * (s * c)).to(torch.float32), vh.to(torch.float32))

    def to_adapter(self, scale: float = 1.0, base=None):
        """The current merge as a scaling-1 :class:`~orthomerge.adapters.LoraAdapter` (no head)."""
        from ..adapters import LoraAdapter

        B, A = {}, {}
        for m in self.states:
            d = self.delta(m, scale)
            B[m], A[m] = (d.B, d.A) if d.A.shape[0] else (torch.zeros(d.B.shape[0], 1), torch.zeros(1, d.A.shape[1]))
        return LoraAdapter.from_factors(B, A, base=base, metadata={"merge": {"method": "continual", "tasks": self.count,
                                                                            "alpha": self.alpha}})


def arrival_order(keys: list[int], order: str) -> list[int]:
    """Positions in merge order: list order (``given``) or sorted by content keys (``shuffle``)."""
    if order == "given":
        return list(range(len(keys)))
    return sorted(range(len(keys)), key=lambda i: (keys[i], i))


def _prepare(ctx: MergeContext) -> Prepared:
    """Stream every adapter through one :class:`ContinualMerger` (model-level norms need all modules)."""
    p = ctx.params
    keys = [module_seed(ctx.seed, key, "arrival") for key in ctx.keys]
    order = arrival_order(keys, p["order"])
    merger = ContinualMerger(p["alpha"], p["norm_scope"], int(p["max_rank"]))
    for i in order:
        merger.add_adapter(ctx.adapters[i], ctx.weights[i])
    extras = {m: {"merged": merger.delta(m)} for m in ctx.modules}
    return Prepared(extras, {"continual": {"order": [ctx.names[i] for i in order], "lambda_t": merger.lambdas,
                                           "ranks": {m: int(merger.states[m][1].numel()) for m in ctx.modules},
                                           "discarded_energy": merger.discarded_sq}})


@register("continual", space="factored", family="continual", prepare=_prepare,
          summary="OPCM continual merging: each update projected off the merged one's top/diagonal "
                  "singular directions, adaptive norm scaling; factored, constant memory")
def continual(updates: ModuleUpdates, alpha: float = 0.5, scale: float = 1.0,
              order: Literal["shuffle", "given"] = "shuffle", norm_scope: Literal["model", "module"] = "model",
              max_rank: int = 0) -> LowRank:
    """OPCM for one module. Through the API the merge was streamed in ``prepare`` (model-level norms);
    called on its own, the module is the whole model and the order comes from ``task.seeds``."""
    if updates.extras and "merged" in updates.extras:
        d = updates.extras["merged"]
        return LowRank(d.B * scale, d.A)
    merger = ContinualMerger(alpha, "module", int(max_rank))
    keys = updates.seeds or list(range(len(updates)))
    for i in arrival_order(keys, order):
        b, a = updates.factors[i]
        merger.add({updates.name: (b * updates.weights[i], a)})
    return merger.delta(updates.name, scale)
