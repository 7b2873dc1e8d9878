"""Layer-wise merges: a merge operator and coefficient chosen per layer, and the RMM-style search for them.

**The ``layerwise`` method** reproduces a per-layer plan exactly: every module belongs to a layer group (the
number after ``layers.`` / ``layer.`` / ``h.`` / ``blocks.`` in its name, ``"other"`` without one), and the
plan gives each group ``{method, params, scale}``. Each distinct (method, params) is merged once over the
whole model at λ = 1 (so model-level steps such as TIES' model-scope thresholds see every module, as in a
whole-model merge), and a group's modules take λ × that method's ΔW. The search writes such a plan as a
recipe that ``orthomerge merge --config`` replays to the same bits.

**The search** (``search --set strategy=layerwise``; in the spirit of Reinforced Model Merging, 2025):
the actions are the candidates of the whole-model search (method × hyper-parameters × λ), chosen per block
of ``block`` layers by a bandit: every episode draws a plan (each block independently, Boltzmann over its
actions' estimated effects, untried actions optimistic), scores it on validation rows, and the effects are
re-fitted as the least-squares additive model reward ≈ c + Σ_blocks θ[block, action] over all episodes so
far — so a block's action is not credited with what the other blocks chose at the time (plain per-block
means are confounded that way and, measured, found a planted 6-layer plan 1–16 times in 20 where the
additive fit found it 20 times in 20; REINFORCE with a running baseline found it 1–7 times in 20). Rewards
come from growing data subsets (multi-fidelity): phase k scores on the rung's number of rows and, after it,
every block keeps only its ``1/eta`` best actions. The result is the better, at full fidelity, of the greedy
plan and the best plan sampled at full fidelity. Sampling uses a generator seeded by the merge seed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import OrthomergeError
from .registry import Dense, MergeContext, ModuleUpdates, Prepared, get_method, register

LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
OTHER = "other"


def layer_of(module: str) -> str:
    """The layer group of a module name: its layer number as text, or ``"other"``."""
    match = LAYER.search(module)
    return str(int(match.group(1))) if match else OTHER


def layer_groups(modules: list[str]) -> dict[str, list[str]]:
    """Modules by layer group, groups in layer order (``"other"`` last)."""
    groups: dict[str, list[str]] = {}
    for m in modules:
        groups.setdefault(layer_of(m), []).append(m)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] == OTHER, int(kv[0]) if kv[0] != OTHER else 0)))


def _key(method: str, params: dict) -> tuple:
    return method, tuple(sorted((k, repr(v)) for k, v in params.items()))


def whole_model_deltas(ctx: MergeContext, method: str, params: dict) -> dict:
    """``method``'s dense ΔW over the whole model at λ = 1 (``scale`` 1 where the method has one)."""
    spec = get_method(method)
    if spec.needs_data or spec.per_task or spec.family == "search":
        raise OrthomergeError(f"layerwise: {method!r} cannot be chosen per layer (data-driven, one update per "
                              "task, or a search)")
    extra = {"scale": 1.0} if "scale" in spec.defaults else {}
    return ctx.merge_dense(method, {**params, **extra})


def plan_deltas(plan: dict, groups: dict[str, list[str]], merged: dict) -> dict:
    """ΔW per module: λ × the chosen method's whole-model ΔW (``merged[_key(method, params)]``)."""
    out = {}
    for group, modules in groups.items():
        choice = plan[group]
        deltas = merged[_key(choice["method"], choice.get("params") or {})]
        lam = choice.get("scale")
        for m in modules:
            out[m] = deltas[m] if lam is None else deltas[m] * lam
    return out


def _prepare(ctx: MergeContext) -> Prepared:
    groups = layer_groups(ctx.modules)
    plan = dict(ctx.params["plan"])
    if "*" in plan:
        default = plan.pop("*")
        plan = {g: plan.get(g, default) for g in groups}
    missing = [g for g in groups if g not in plan]
    if missing:
        raise OrthomergeError(f"layerwise: the plan has no entry for layer {missing[0]!r} (layers: "
                              f"{', '.join(groups)}; use '*' for a default)")
    unknown = sorted(set(plan) - set(groups))
    if unknown:
        raise OrthomergeError(f"layerwise: the plan names layer {unknown[0]!r}, which has no adapted module")
    merged = {}
    for choice in plan.values():
        if not isinstance(choice, dict) or "method" not in choice:
            raise OrthomergeError(f"layerwise: a plan entry is {{method, params, scale}}, got {choice!r}")
        key = _key(choice["method"], choice.get("params") or {})
        if key not in merged:
            merged[key] = whole_model_deltas(ctx, choice["method"], choice.get("params") or {})
    deltas = plan_deltas(plan, groups, merged)
    return Prepared({m: {"update": Dense(deltas[m])} for m in ctx.modules}, {"layerwise": {"plan": plan}})


@register("layerwise", space="dense", family="search", prepare=_prepare,
          summary="a merge operator and λ per layer, from a plan {layer: {method, params, scale}} ('*' = "
                  "default); what search --set strategy=layerwise writes")
def layerwise(updates: ModuleUpdates, plan: dict[str, dict[str, Any]] = {}) -> Dense:  # noqa: B006 (never mutated)
    """The planned update of this module. Through the API it was computed in ``prepare`` from whole-model
    merges; a bare call applies the chosen rule to this module alone (task arithmetic, λ = 1, for an
    empty plan), which is the same for rules without model-level steps."""
    if updates.extras and "update" in updates.extras:
        return updates.extras["update"]
    choice = plan.get(layer_of(updates.name), plan.get("*", {"method": "task_arithmetic", "scale": 1.0}))
    spec = get_method(choice["method"])
    extra = {"scale": 1.0} if "scale" in spec.defaults else {}
    out = spec.fn(updates, **spec.resolve({**(choice.get("params") or {}), **extra}))
    delta = out.delta if isinstance(out, Dense) else out.B @ out.A
    lam = choice.get("scale")
    return Dense(delta if lam is None else delta * lam)


# ---------------------------------------------------------------- the search


@dataclass
class Episode:
    phase: int
    samples: int
    plan: list[int]        # action index per block
    score: float

    def as_dict(self) -> dict:
        return {"phase": self.phase, "samples": self.samples, "plan": self.plan, "score": self.score}


@dataclass
class LayerwiseOutcome:
    plan: dict                 # layer group -> {method, params, scale}
    score: float               # at full fidelity
    deltas: dict
    episodes: list[Episode] = field(default_factory=list)
    fidelities: list[int] = field(default_factory=list)


def blocks_of(groups: dict[str, list[str]], block: int) -> list[list[str]]:
    """Consecutive layer groups in blocks of ``block`` (``"other"`` is a block of its own)."""
    if block < 1:
        raise OrthomergeError(f"search: block={block} must be ≥ 1")
    layered = [g for g in groups if g != OTHER]
    out = [layered[i:i + block] for i in range(0, len(layered), block)]
    return out + ([[OTHER]] if OTHER in groups else [])


def additive_effects(plans: list[list[int]], rewards: list[float], shape: tuple[int, int],
                     ridge: float = 1e-3) -> torch.Tensor:
    """``θ[block, action]`` of the least-squares fit reward ≈ c + Σ_b θ[b, a_b] over the episodes so far (ridge).

    Every block's effect is estimated with the other blocks' choices accounted for, so an action tried
    while the rest of the plan was good is not credited with the rest's merit (plain per-block means are)."""
    blocks, actions = shape
    x = torch.zeros(len(plans), blocks * actions, dtype=torch.float64)
    for e, plan in enumerate(plans):
        x[e, torch.arange(blocks) * actions + torch.tensor(plan)] = 1.0
    y = torch.tensor(rewards, dtype=torch.float64)
    y = y - y.mean()
    theta = torch.linalg.solve(x.T @ x + ridge * torch.eye(blocks * actions, dtype=torch.float64), x.T @ y)
    return theta.view(blocks, actions)


def _policy(effects: torch.Tensor, count: torch.Tensor, alive: torch.Tensor, explore: float) -> torch.Tensor:
    """Per block, a Boltzmann distribution over the actions' estimated effects at temperature ``explore`` ×
    their spread; an untried action counts as the block's best plus one temperature (optimism). Blocks
    draw independently of each other."""
    tried = count > 0
    spread = float(effects[tried].std()) if int(tried.sum()) > 1 else 0.0
    temp = explore * spread if spread > 0 else 1.0
    best = torch.where(tried, effects, torch.full_like(effects, -math.inf)).amax(-1, keepdim=True)
    best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
    value = torch.where(tried, effects, best + temp)
    return torch.softmax((value / temp).masked_fill(~alive, -math.inf), -1)


def layerwise_search(ctx: MergeContext, candidates: list[tuple[str, dict, float | None]], scorer, rungs: list[int],
                     *, eta: float, block: int, episodes: int, explore: float, seed: int) -> LayerwiseOutcome:
    """A bandit per block over ``candidates`` (method, params, λ), rewarded on growing row subsets."""
    groups = layer_groups(ctx.modules)
    blocks = blocks_of(groups, block)
    merged = {}
    for method, params, _ in candidates:
        key = _key(method, params)
        if key not in merged:
            merged[key] = whole_model_deltas(ctx, method, params)

    def plan_of(actions: list[int]) -> dict:
        plan = {}
        for blk, a in zip(blocks, actions):
            method, params, lam = candidates[a]
            for g in blk:
                plan[g] = {"method": method, "params": dict(params), "scale": lam}
        return plan

    def score(actions: list[int], n: int) -> float:
        return float(scorer(plan_deltas(plan_of(actions), groups, merged), n))

    shape = (len(blocks), len(candidates))
    count = torch.zeros(shape, dtype=torch.float64)
    alive = torch.ones(shape, dtype=torch.bool)
    generator = torch.Generator().manual_seed(int(seed))
    history: list[Episode] = []
    best_full: tuple[float, list[int]] | None = None

    plans: list[list[int]] = []
    rewards: list[float] = []

    def effects() -> torch.Tensor:
        return additive_effects(plans, rewards, shape) if plans else torch.zeros(shape, dtype=torch.float64)

    for phase, n in enumerate(rungs):
        for _ in range(max(1, episodes)):
            probs = _policy(effects(), count, alive, explore)
            actions = torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()
            reward = score(actions, n)
            history.append(Episode(phase, n, actions, reward))
            plans.append(actions)
            finite = [r for r in rewards if math.isfinite(r)]
            # a refused plan (−∞, e.g. below a safety floor) enters the fit as worse than any seen
            rewards.append(reward if math.isfinite(reward) else (min(finite) if finite else 0.0) - 1.0)
            count[torch.arange(len(blocks)), actions] += 1
            if phase == len(rungs) - 1 and (best_full is None or reward > best_full[0]):
                best_full = (reward, actions)
        if phase < len(rungs) - 1:   # narrow: each block keeps its 1/eta best actions by estimated effect
            keep = max(1, math.ceil(int(alive[0].sum()) / eta))
            # ties (e.g. untried actions, all at effect 0) are broken at random, not in candidate order
            jitter = 1e-9 * torch.rand(shape, generator=generator, dtype=torch.float64)
            ranked = torch.sort((effects() + jitter).masked_fill(~alive, -math.inf), dim=-1, descending=True).indices
            alive = torch.zeros_like(alive)
            alive.scatter_(1, ranked[:, :keep], True)
    greedy = effects().masked_fill(~alive, -math.inf).argmax(-1).tolist()
    greedy_score = score(greedy, rungs[-1])
    history.append(Episode(len(rungs), rungs[-1], greedy, greedy_score))
    reward, actions = max([(greedy_score, greedy)] + ([best_full] if best_full else []), key=lambda x: x[0])
    plan = plan_of(actions)
    return LayerwiseOutcome(plan, reward, plan_deltas(plan, groups, merged), history, rungs)
