"""Element-wise rules on dense task matrices: TIES, DARE (linear / TIES), magnitude prune, and their kernels.

The papers define these on dense ΔW_i (docs/merging.md#element-wise-rules-need-a-basis); the registered ``ties``, ``dare_*`` and
``magnitude_prune`` run them there, streamed: one module at a time, float32, each task's ΔW_i built from
its factors only when needed (once for the trim threshold, then in row blocks), so peak memory is a few
dense matrices of one module whatever the number of tasks. The same kernels run on Core-Space / KnOTS
coordinates in :mod:`orthomerge.merge.subspace` (different methods, different names).

Choices where implementations disagree (each an option; defaults named):

* **trim threshold** — per task, keep the entries with ``|τ| ≥ t``, ``t`` = the k-th largest ``|τ|``,
  ``k = ⌊density·numel⌋`` (PEFT's k). Ties at ``t`` are all kept (may keep slightly more than k).
  Found by selection (``select="partition"``: numpy in-place introselect, default; ``"kthvalue"``:
  ``torch.kthvalue``), never a full sort (``"sort"`` exists only as the benchmark baseline).
* **trim scope** — ``"tensor"`` (default; PEFT, mergekit: one threshold per task and module) or
  ``"model"`` (TIES reference code: one threshold per task over all its modules; computed exactly with a
  streamed histogram by the methods' ``prepare`` hook, :func:`prepare_trim_scope`).
* **sign election** — ``sign="total"`` (default; γ = sign Σ_i w_i τ̂_i, TIES "sum of values", weighted as
  in mergekit; PEFT elects on the unweighted τ̂_i — identical for equal positive weights) or
  ``"frequency"`` (γ = sign Σ_i sign(w_i τ̂_i)). A zero sum elects +1 (PEFT).
* **disjoint mean normaliser** — ``normalize="count"`` (default; TIES reference code, PEFT, MergeLM/EMR:
  divide by the number of agreeing tasks) or ``"weight"`` (mergekit ``normalize: true``: divide by the
  sum of |w_i| of the agreeing tasks).
* **DARE** — keep each entry with probability ``density`` (= 1 − p), rescale kept entries by 1/density
  (``rescale=True``, default). The mask of (task, module, row block) comes from a generator seeded by
  the task's seed for that module and the block index only, so it is independent of adapter order and
  of the number of adapters.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ..errors import OrthomergeError
from .registry import Dense, Density, MergeContext, ModuleUpdates, Prepared, broadcast, register

BLOCK_ELEMENTS = 1 << 18  # entries of one task's row block (DARE masks are generated per block)


def block_rows(n: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(n, 1))


def kth_largest_abs(x: torch.Tensor, k: int, select: str = "partition") -> float:
    """The k-th largest ``|x|`` (1 ≤ k ≤ numel). ``x`` is consumed (its storage is reused)."""
    a = x.reshape(-1).abs_()
    pos = a.numel() - k
    if select == "partition":
        arr = a.cpu().numpy()   # numpy introselect (on the CPU whatever the device)
        arr.partition(pos)
        return float(arr[pos])
    if select == "kthvalue":
        return float(torch.kthvalue(a, pos + 1).values)
    if select == "sort":
        return float(torch.sort(a).values[pos])
    raise OrthomergeError(f"select={select!r}: choose partition, kthvalue or sort")


def trim_threshold(x: torch.Tensor, density: float, select: str = "partition") -> float:
    """Threshold ``t`` so that ``|x| ≥ t`` keeps the top ``⌊density·numel⌋`` entries (ties kept)."""
    k = int(density * x.numel())
    if k >= x.numel():
        return 0.0
    if k <= 0:
        return float("inf")
    return kth_largest_abs(x, k, select)


def check_density(density: list[float]) -> None:
    for d in density:
        if not 0.0 < d <= 1.0:
            raise OrthomergeError(f"density {d} is outside (0, 1]: density 0 keeps nothing (an all-zero update)")


def task_thresholds(updates, density, select: str = "partition") -> list[float]:
    """Per-tensor trim thresholds, one task's dense matrix in memory at a time."""
    dens = broadcast(density, len(updates), "density")
    check_density(dens)
    return [trim_threshold(updates.full(i), d, select) for i, d in enumerate(dens)]


def dare_mask(seed: int, block: int, shape: tuple[int, int], density: float) -> torch.Tensor:
    """Bernoulli(density) keep-mask for one row block, from a generator seeded by (seed, block)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + block) % (2**63 - 1))
    return torch.rand(shape, generator=g) < density


def elect_disjoint(weighted: torch.Tensor, weights: torch.Tensor, sign: str, normalize: str) -> torch.Tensor:
    """TIES elect + disjoint mean over the first dim of ``weighted`` [T, b, n] (entries w_i τ̂_i), which it
    consumes (overwrites) so that one [T, b, n] buffer is all the block needs.

    The agreeing entries are those with ``γ·x > 0`` (``sign(x) = γ``); their sum is ``γ · Σ max(γ·x, 0)``,
    exactly the sum of the agreeing x (a product by ±1 and the negation of a sum are exact)."""
    if sign == "total":
        votes = weighted.sum(0)
    elif sign == "frequency":
        votes = torch.sign(weighted).sum(0)
    else:
        raise OrthomergeError(f"sign={sign!r}: choose total or frequency")
    if normalize not in ("count", "weight"):
        raise OrthomergeError(f"normalize={normalize!r}: choose count or weight")
    gamma = torch.where(votes >= 0, 1.0, -1.0)
    aligned = weighted.mul_(gamma).clamp_(min=0.0)   # γ·x where x agrees with γ, else 0
    agree = aligned > 0
    num = aligned.sum(0).mul_(gamma)
    den = (agree.sum(0).to(num.dtype) if normalize == "count"
           else (agree * weights.abs()).sum(0))
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _blocks(updates, prepare):
    """Yield ``(start, stop, stacked)``: row blocks of every task, each passed through ``prepare(i, j, x)``,
    in one [T, rows, n] buffer (reused: a caller may overwrite it)."""
    m, n = updates.shape
    step = block_rows(n)
    buffer = torch.empty((len(updates), min(step, m), n), dtype=torch.float32, device=updates.device)
    for j, start in enumerate(range(0, m, step)):
        stop = min(start + step, m)
        stacked = buffer[:, :stop - start]
        for i in range(len(updates)):
            stacked[i] = prepare(i, j, updates.rows(i, start, stop))
        yield start, stop, stacked


def _trimmer(thresholds):
    def prepare(i, j, x):
        return x.masked_fill_(x.abs() < thresholds[i], 0.0) if thresholds[i] > 0 else x
    return prepare


def _dropper(updates, density, rescale: bool):
    dens = broadcast(density, len(updates), "density")
    check_density(dens)
    seeds = updates.seeds or list(range(len(updates)))

    def prepare(i, j, x):
        if dens[i] >= 1.0:
            return x
        if dens[i] <= 0.0:
            return x.zero_()
        x = x * dare_mask(seeds[i], j, tuple(x.shape), dens[i]).to(x.device)   # same masks on every device
        return x / dens[i] if rescale else x
    return prepare


def _combine(updates, prepare, reduce) -> torch.Tensor:
    out = torch.empty(updates.shape, dtype=torch.float32, device=updates.device)
    w = torch.tensor(updates.weights, dtype=torch.float32, device=updates.device).view(-1, 1, 1)
    for start, stop, stacked in _blocks(updates, prepare):
        out[start:stop] = reduce(stacked.mul_(w), w)
    return out


def _weighted_sum(weighted, _w):
    return weighted.sum(0)


def _ties_reduce(sign, normalize):
    return lambda weighted, w: elect_disjoint(weighted, w, sign, normalize)


# ---------------------------------------------------------------- kernels on any task matrices

Sign = Literal["total", "frequency"]
Normalize = Literal["count", "weight"]
Select = Literal["partition", "kthvalue", "sort"]


def _thresholds(updates, density, select):
    """Model-scope thresholds a ``prepare`` hook computed (``updates.extras``), else per tensor."""
    given = (getattr(updates, "extras", None) or {}).get("thresholds")
    return given if given is not None else task_thresholds(updates, density, select)


def ties_kernel(updates, density: Density = 0.2, scale: float = 1.0, sign: Sign = "total",
                normalize: Normalize = "count", select: Select = "partition") -> torch.Tensor:
    """TIES: trim to the top ``density`` by |τ_i|, elect γ, disjoint mean, × λ (``scale``)."""
    t = _thresholds(updates, density, select)
    return _combine(updates, _trimmer(t), _ties_reduce(sign, normalize)).mul_(scale)


def magnitude_prune_kernel(updates, density: Density = 0.2, scale: float = 1.0,
                           select: Select = "partition") -> torch.Tensor:
    """Trim each τ_i to its top ``density`` by magnitude, then λ Σ w_i τ̂_i (no sign election; PEFT)."""
    t = _thresholds(updates, density, select)
    return _combine(updates, _trimmer(t), _weighted_sum).mul_(scale)


def dare_linear_kernel(updates, density: Density = 0.5, scale: float = 1.0, rescale: bool = True) -> torch.Tensor:
    """DARE then task arithmetic: λ Σ w_i (m_i ⊙ τ_i)/density, m_i ~ Bernoulli(density)."""
    return _combine(updates, _dropper(updates, density, rescale), _weighted_sum).mul_(scale)


def dare_ties_kernel(updates, density: Density = 0.5, scale: float = 1.0, rescale: bool = True, sign: Sign = "total",
                     normalize: Normalize = "count") -> torch.Tensor:
    """DARE drop/rescale instead of the magnitude trim, then TIES election and disjoint mean."""
    return _combine(updates, _dropper(updates, density, rescale), _ties_reduce(sign, normalize)).mul_(scale)


def ta_kernel(updates, scale: float = 1.0) -> torch.Tensor:
    """λ Σ w_i τ_i on explicit matrices (Core-Space / KnOTS coordinates)."""
    return _combine(updates, lambda i, j, x: x, _weighted_sum).mul_(scale)


# ---------------------------------------------------------------- model-scope trim thresholds

TrimScope = Literal["tensor", "model"]


def model_thresholds(adapters, modules, density) -> list[float]:
    """One exact threshold per task over all its modules (streamed), as the TIES reference code trims."""
    dens = broadcast(density, len(adapters), "density")
    check_density(dens)
    out = []
    for adapter, d in zip(adapters, dens):
        def chunks(adapter=adapter):
            for m in modules:
                b, a = adapter.factors(m)
                yield b.to(torch.float32) @ a.to(torch.float32)
        out.append(abs_histogram_threshold(chunks, d))
    return out


def prepare_trim_scope(ctx: MergeContext) -> Prepared:
    """``prepare`` hook of the trimming methods: with ``trim_scope="model"`` every module's rule gets the
    model-wide thresholds in ``extras["thresholds"]``; with ``"tensor"`` it trims per module."""
    if ctx.params["trim_scope"] != "model":
        return Prepared()
    thresholds = model_thresholds(ctx.adapters, ctx.modules, ctx.params["density"])
    return Prepared({m: {"thresholds": thresholds} for m in ctx.modules})


# ---------------------------------------------------------------- registered dense-space methods


@register("ties", space="dense", family="elementwise", prepare=prepare_trim_scope,
          summary="TIES on dense ΔW: trim (density), elect sign, disjoint mean; re-compressed or --dense")
def ties(updates: ModuleUpdates, density: Density = 0.2, scale: float = 1.0, sign: Sign = "total",
         normalize: Normalize = "count", select: Select = "partition", trim_scope: TrimScope = "tensor") -> Dense:
    """TIES-Merging (Yadav et al. 2023) on dense ΔW_i; identity at density 1 (one adapter, weight 1)."""
    return Dense(ties_kernel(updates, density, scale, sign, normalize, select))


@register("magnitude_prune", space="dense", family="elementwise", prepare=prepare_trim_scope,
          summary="keep each ΔW_i's top-density entries by magnitude, weighted sum (PEFT magnitude_prune)")
def magnitude_prune(updates: ModuleUpdates, density: Density = 0.2, scale: float = 1.0, select: Select = "partition",
                    trim_scope: TrimScope = "tensor") -> Dense:
    """Magnitude pruning then weighted sum; identity at density 1."""
    return Dense(magnitude_prune_kernel(updates, density, scale, select))


@register("dare_linear", space="dense", family="elementwise", random=True,
          summary="DARE (drop 1-density, rescale) on dense ΔW_i, then weighted sum; seeded per adapter+module")
def dare_linear(updates: ModuleUpdates, density: Density = 0.5, scale: float = 1.0, rescale: bool = True) -> Dense:
    """DARE + task arithmetic (Yu et al. 2024); identity at density 1 (p = 0)."""
    return Dense(dare_linear_kernel(updates, density, scale, rescale))


@register("dare_ties", space="dense", family="elementwise", random=True,
          summary="DARE drop/rescale on dense ΔW_i, then TIES sign election and disjoint mean")
def dare_ties(updates: ModuleUpdates, density: Density = 0.5, scale: float = 1.0, rescale: bool = True,
              sign: Sign = "total", normalize: Normalize = "count") -> Dense:
    """DARE + TIES election/disjoint mean; identity at density 1 (p = 0)."""
    return Dense(dare_ties_kernel(updates, density, scale, rescale, sign, normalize))


def abs_histogram_threshold(chunks, density: float, bins: int = 1 << 16) -> float:
    """Exact k-th largest |x| over several tensors without holding them together (TIES ``trim_scope="model"``).

    ``chunks`` is a callable returning a fresh iterator of tensors (e.g. one task's ΔW per module, built
    on the fly). Pass 1: count and global max; pass 2: a histogram of |x| locates the bin holding the k-th
    largest value; pass 3: the values of that bin, selected exactly. The same bin formula serves passes
    2 and 3, so the counts agree.
    """
    total, top = 0, 0.0
    for c in chunks():
        total += c.numel()
        top = max(top, float(c.abs().max()))
    k = int(density * total)
    if k >= total or top == 0:
        return 0.0
    if k <= 0:
        return float("inf")

    def bin_of(c):
        return (c.abs().to(torch.float64) * (bins / top)).floor_().clamp_(max=bins - 1).long().reshape(-1)

    hist = torch.zeros(bins, dtype=torch.long)
    for c in chunks():
        hist += torch.bincount(bin_of(c), minlength=bins)
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # above[b] = #values in bins ≥ b
    b = int((above >= k).nonzero().max())
    k_in_bin = k - (int(above[b + 1]) if b + 1 < bins else 0)
    vals = np.concatenate([c.abs().reshape(-1)[bin_of(c) == b].numpy() for c in chunks()])
    pos = vals.size - k_in_bin
    vals.partition(pos)
    return float(vals[pos])
