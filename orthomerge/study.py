"""The OSRM study's statistics and fixed-in-advance choices, as pure functions (no I/O, no global state).

* :func:`minimum_detectable_difference` — the smallest paired difference a study of ``n`` pairs detects
  with 80 % power (two-sided α = 0.05), from the exact noncentral-t power of the paired t-test;
* :func:`task_subsets` — the task subsets of each size N merged for the number-of-tasks curve, a function of
  the task names, the sizes and a seed only (so every arm merges the same subsets);
* :func:`lambda_robustness` — a λ curve's minimum over λ ∈ [0.3, 0.8] and its mean over the whole grid;
* :func:`best_eligible` / :func:`recommend_variant` / :func:`choose_beta` — the decision rule written in the
  README before the run: the best validation merged score among candidates whose single-task mean is within
  1 point of standard LoRA's.
"""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np

from .errors import OrthomergeError

POWER = 0.8
ALPHA = 0.05
NTASKS_SIZES = (2, 4, 6, 8)      # numbers of merged tasks for the number-of-tasks curve
SUBSETS_PER_SIZE = 3             # subsets drawn per size (all of them when there are fewer)
LAMBDA_WINDOW = (0.3, 0.8)       # the λ range over which the worst case is taken
SINGLE_TASK_TOLERANCE = 0.01     # "within 1 point" of LoRA's single-task mean (scores in [0, 1])
DECISION_METHOD = "task_arithmetic"


def paired_power(delta: float, n: int, sd: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test (n pairs, df = n − 1) when the true mean difference is
    ``delta`` and the paired differences have standard deviation ``sd``: P(|T| > t_{1−α/2}) with
    T ~ noncentral t(df, δ√n / sd)."""
    from scipy.stats import nct, t

    df = n - 1
    crit = t.ppf(1 - alpha / 2, df)
    nc = delta * math.sqrt(n) / sd
    return float(nct.sf(crit, df, nc) + nct.sf(crit, df, -nc))   # P(T < −c | nc) = P(T > c | −nc), NaN-free


def minimum_detectable_difference(n: int, sd: float, power: float = POWER, alpha: float = ALPHA) -> float:
    """The true mean difference δ > 0 at which the two-sided paired t-test over ``n`` pairs rejects with
    probability ``power``: the root of :func:`paired_power` (exact noncentral t, not the normal
    approximation (t_{1−α/2} + t_{power})·sd/√n, which understates δ for few pairs). NaN when n < 2 or
    ``sd`` is not finite; 0 when sd = 0."""
    from scipy.optimize import brentq

    if n < 2 or not np.isfinite(sd):
        return float("nan")
    if sd == 0:
        return 0.0
    if not 0 < alpha < 1 or not alpha < power < 1:
        raise OrthomergeError(f"need 0 < alpha < power < 1, got alpha {alpha}, power {power}")
    high = sd
    while paired_power(high, n, sd, alpha) < power:   # power rises with δ; bracket the root
        high *= 2
    return float(brentq(lambda d: paired_power(d, n, sd, alpha) - power, 0.0, high, xtol=1e-12 * sd))


def task_subsets(names: list[str], sizes=NTASKS_SIZES, seed: int = 0,
                 per_size: int = SUBSETS_PER_SIZE) -> dict[int, list[tuple[str, ...]]]:
    """For each N in ``sizes`` (N ≤ the number of tasks; larger N are left out), ``per_size`` distinct
    N-task subsets (all of them when fewer exist), drawn with a generator seeded by (seed, N).

    A pure function of the *set* of names, the sizes and the seed — not of their order, the arm or
    anything else — so every arm merges the same subsets. Each subset lists its tasks in ``names``' order.
    """
    if len(set(names)) != len(names):
        raise OrthomergeError(f"task names must be distinct, got {names}")
    if any(int(n) < 2 for n in sizes):
        raise OrthomergeError(f"a merge needs at least 2 tasks, got sizes {list(sizes)}")
    if per_size < 1:
        raise OrthomergeError(f"per_size must be ≥ 1, got {per_size}")
    canonical = sorted(names)
    position = {name: i for i, name in enumerate(names)}
    out = {}
    for size in sorted({int(n) for n in sizes}):
        if size > len(names):
            continue
        every = list(combinations(canonical, size))
        rng = np.random.default_rng([seed, size])
        picked = rng.choice(len(every), size=min(per_size, len(every)), replace=False)
        out[size] = [tuple(sorted(every[i], key=position.get)) for i in sorted(picked)]
    return out


def lambda_robustness(curve: dict, window: tuple[float, float] = LAMBDA_WINDOW) -> dict:
    """``{"window_min", "mean"}`` of a λ → normalised-score curve (keys may be JSON strings): the minimum
    over the λ inside ``window`` (inclusive; NaN if none) and the mean over the whole grid (NaN if empty)."""
    points = {float(k): float(v) for k, v in curve.items()}
    inside = [v for k, v in points.items() if window[0] - 1e-12 <= k <= window[1] + 1e-12]
    return {"window_min": float(min(inside)) if inside else float("nan"),
            "mean": float(np.mean(list(points.values()))) if points else float("nan")}


def validation_choice(merge: dict) -> float:
    """A merge's validation normalised score at its chosen λ (curve keys are strings once read from JSON)."""
    curve = {float(k): v for k, v in merge["val_curve"].items()}
    return float(curve[float(merge["lambda"])])


def best_eligible(scores: dict, single: dict, reference_single: float,
                  tolerance: float = SINGLE_TASK_TOLERANCE) -> dict:
    """The candidate with the highest ``scores`` among those whose ``single`` is at least
    ``reference_single − tolerance`` (better single-task quality never disqualifies). Ties go to the
    candidate listed first in ``scores``. Candidates without a finite score or single-task mean are not
    eligible. Returns ``{"choice", "eligible"}`` (choice None when nothing is eligible)."""
    eligible = [c for c in scores if c in single and np.isfinite(scores[c]) and np.isfinite(single[c])
                and single[c] >= reference_single - tolerance - 1e-12]
    order = list(scores)
    choice = max(eligible, key=lambda c: (scores[c], -order.index(c))) if eligible else None
    return {"choice": choice, "eligible": eligible}


def recommend_variant(validation_merged: dict[str, float], validation_single: dict[str, float],
                      reference: str = "lora", tolerance: float = SINGLE_TASK_TOLERANCE) -> dict:
    """The study's decision rule, fixed before the run: among the arms whose single-task mean (validation)
    is within ``tolerance`` of ``reference``'s (standard LoRA), the arm with the best validation normalised
    score of the task-arithmetic merge. Standard LoRA itself is a candidate: if it wins, no variant is
    recommended over it. Inputs are per-arm means over seeds; only validation numbers enter, so the
    recommended arm's test scores are an unbiased report of the choice."""
    if reference not in validation_single or reference not in validation_merged:
        raise OrthomergeError(f"the decision rule needs the reference arm {reference!r}")
    result = best_eligible(validation_merged, validation_single, validation_single[reference], tolerance)
    return {"recommended": result["choice"], "eligible": result["eligible"], "reference": reference,
            "tolerance": tolerance}


def choose_beta(validation_merged: dict[float, float], validation_single: dict[float, float],
                reference_single: float, tolerance: float = SINGLE_TASK_TOLERANCE) -> float:
    """β for ``osrm-beta`` from a grid, on validation, by the same rule as :func:`recommend_variant`:
    the best validation merged score among the β whose single-task mean is within ``tolerance`` of
    standard LoRA's (``reference_single``); ties go to the smaller β (closer to the paper's β = 0). When
    no β is eligible, the β with the best single-task mean (the least starved)."""
    order = sorted(validation_merged)
    merged = {b: validation_merged[b] for b in order}
    choice = best_eligible(merged, validation_single, reference_single, tolerance)["choice"]
    if choice is None:
        finite = [b for b in order if np.isfinite(validation_single.get(b, float("nan")))]
        if not finite:
            raise OrthomergeError("no β has a finite single-task score")
        choice = max(finite, key=lambda b: (validation_single[b], -order.index(b)))
    return choice
