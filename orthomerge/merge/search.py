"""Automated choice of merge method and hyper-parameters on a small validation budget, multi-fidelity.

In the spirit of "Fine, I'll Merge It Myself" and "Reinforced Model Merging" (search over merge recipes
scored on held-out data), done as successive halving: every candidate (method × its grid × λ) is scored
on the first ``min_samples`` validation rows of every task; the best 1/``eta`` are promoted to ``eta``
times more rows, and so on up to the full validation split (``samples`` rows, 0 = all). The winner is
the best at the highest fidelity. Each (method, parameters) is merged once, at λ = 1, with the dense
result kept only while some λ of it is alive; λ candidates are rescalings (every searched method is linear
in its ``scale``; methods without ``scale`` are scored as they are).

Score: each task's metric (its own head, its own validation rows), divided by its own adapter's score on
the same rows (``objective="normalised"``, the experiment's normalised accuracy) or raw (``"raw"``),
averaged over tasks. Data: ``split="validation"`` rows (never test). Output: the merged update of the
winner (what the registry rule returns per module), the trials in ``merge_report.json`` and the winner's
recipe, written as ``OUT/recipe.yaml`` (a file of its ``prepare`` result) — loadable by
``orthomerge merge --config OUT/recipe.yaml --out OTHER``. A bare rule call without a search result is
task arithmetic at λ = 1 (the first default candidate).

``strategy="layerwise"`` searches the same candidates per block of ``block`` layers instead, with a
bandit over per-block choices (:mod:`orthomerge.merge.layerwise`); its recipe uses the ``layerwise`` method.
Both strategies count the rows they score (``rows_evaluated``: task-example evaluations, the unit of a
fair comparison at equal budget).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

import numpy as np
import torch
import yaml
from pydantic import Field

from ..errors import OrthomergeError
from ..patching import patched
from .data import TaskModels, adapter_templates, data_split
from .layerwise import layerwise_search
from .linear import task_arithmetic
from .registry import Dense, MergeContext, ModuleUpdates, Prepared, get_method, register

DEFAULT_METHODS = "task_arithmetic,ties,tsv,iso_c,do_merging,continual"
RECIPE_NAME = "recipe.yaml"   # the winner, loadable by ``orthomerge merge --config``


@dataclass
class Trial:
    method: str
    params: dict
    scale: float | None
    rung: int
    samples: int
    score: float

    def as_dict(self) -> dict:
        return {"method": self.method, "params": self.params, "lambda": self.scale, "rung": self.rung,
                "samples": self.samples, "score": self.score}


@dataclass
class SearchOutcome:
    best: tuple            # (method, params, λ or None)
    score: float           # at the highest fidelity it reached
    trials: list[Trial] = field(default_factory=list)
    fidelities: list[int] = field(default_factory=list)
    deltas: dict | None = None   # the winner's merged ΔW per module (λ applied)


def _floats(text) -> list[float]:
    """``"0.5,1"``, ``0.5`` or ``[0.5, 1]`` as a list of floats."""
    items = text if isinstance(text, (list, tuple)) else [text] if isinstance(text, (int, float)) else str(text).split(",")
    try:
        return [float(v) for v in items if str(v).strip()]
    except ValueError:
        raise OrthomergeError(f"search: {text!r} is not a comma-separated list of numbers") from None


def grid(methods: str | list[str], lambdas, densities) -> list[tuple[str, dict, list]]:
    """``[(method, params, λ list or [None])]``: density grid for methods that take one, λ for those with ``scale``."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    out = []
    for name in filter(None, names):
        spec = get_method(name)
        if spec.per_task or spec.family == "search":
            raise OrthomergeError(f"search: {name!r} cannot be searched (one update per task, or search itself)")
        lams = _floats(lambdas) if "scale" in spec.defaults else [None]
        dens = _floats(densities) if "density" in spec.defaults else [None]
        for d in dens:
            out.append((name, {} if d is None else {"density": d}, lams))
    if not out:
        raise OrthomergeError("search: no candidate methods")
    return out


def fidelities(min_samples: int, full: int, eta: float) -> list[int]:
    """Row counts of the rungs: min_samples · eta^k, ending with ``full``."""
    if eta <= 1 or min_samples < 1:
        raise OrthomergeError(f"search: need eta > 1 and min_samples ≥ 1 (got {eta}, {min_samples})")
    out, n = [], int(min_samples)
    while n < full:
        out.append(n)
        n = int(math.ceil(n * eta))
    return out + [full]


def successive_halving(groups, merge, scorer, rungs: list[int], eta: float) -> SearchOutcome:
    """Score every (group, λ) on ``rungs[0]`` rows, keep the top 1/eta, repeat; ``merge(method, params)``
    gives dense ΔW per module at λ = 1, ``scorer(deltas, n)`` a number (higher is better)."""
    alive = [(g, lam) for g, (_, _, lams) in enumerate(groups) for lam in lams]
    cache: dict[int, dict] = {}
    trials: list[Trial] = []
    scores: dict = {}
    for rung, n in enumerate(rungs):
        scores = {}
        for g, lam in alive:
            method, params, _ = groups[g]
            if g not in cache:
                cache[g] = merge(method, params)
            deltas = cache[g] if lam is None else {m: d * lam for m, d in cache[g].items()}
            scores[(g, lam)] = float(scorer(deltas, n))
            trials.append(Trial(method, params, lam, rung, n, scores[(g, lam)]))
        # best first; ties: λ nearer 1, then candidate order (deterministic)
        alive.sort(key=lambda c: (-np.nan_to_num(scores[c], nan=-np.inf), abs((c[1] or 1.0) - 1.0)))
        if rung < len(rungs) - 1:
            alive = alive[:max(1, int(math.ceil(len(alive) / eta)))]
            for g in list(cache):
                if all(g != a[0] for a in alive):
                    del cache[g]
    g, lam = alive[0]
    method, params, _ = groups[g]
    deltas = cache[g] if lam is None else {m: d * lam for m, d in cache[g].items()}
    return SearchOutcome((method, params, lam), scores[(g, lam)], trials, rungs, deltas)


class ValidationScorer:
    """Mean over tasks of the metric on the first n validation rows (each task with its own head, or a
    causal LM's label scoring), normalised by the task's own adapter on the same rows
    (``objective="normalised"``) or raw. With ``safety_min`` > 0 (causal LMs), a merge whose refusal rate
    on the first ``safety_prompts`` bundled harmful prompts of ``safety_part`` (default ``validation``,
    :func:`orthomerge.safety.split_part`) falls below ``safety_min`` scores −∞: it is never chosen."""

    def __init__(self, ctx: MergeContext, splits, metrics, max_length: int, batch_size: int, objective: str,
                 safety_min: float = 0.0, safety_prompts: int = 0, safety_part: str = "validation"):
        self.causal = ctx.adapters[0].task_type == "CAUSAL_LM"
        self.models = None if self.causal else TaskModels(ctx.model, ctx.adapters, ctx.names)
        self.model = ctx.model
        self.tokenizer = ctx.get_tokenizer()
        self.splits, self.metrics, self.objective = splits, metrics, objective
        self.labels = [getattr(item, "label_names", None) for item in ctx.data]
        self.prompts = adapter_templates(ctx)
        self.sizes = max_length, batch_size
        self.own = [{m: a.delta(m).to(torch.float32) for m in ctx.modules} for a in ctx.adapters]
        self.expert: dict = {}
        self.calls = 0   # task evaluations
        self.rows = 0    # task-example evaluations (the search budget's unit)
        if safety_min > 0 and not self.causal:
            raise OrthomergeError("search: safety_min needs causal-LM adapters (a model that generates)")
        self.safety_min, self.safety_prompts, self.safety_part = safety_min, safety_prompts, safety_part
        self.refusals: dict[tuple, float] = {}   # refusal rate per merge checked (keyed by its ΔW norms)

    def task_score(self, i: int, deltas: dict, n: int) -> float:
        from ..tasks import compute_metric

        split = self.splits[i].take(n)
        self.calls += 1
        self.rows += len(split)
        if self.causal:
            from ..causal import score_split

            with patched(self.model, deltas) as model:
                return score_split(model, self.tokenizer, split, self.labels[i], self.metrics[i], self.prompts[i],
                                   *self.sizes)
        from ..evaluate import predict

        with patched(self.models.get(i), deltas) as model:
            preds = predict(model, self.tokenizer, split, *self.sizes)
        return compute_metric(self.metrics[i], preds, split.labels)

    def safe(self, deltas: dict) -> bool:
        """Whether the merge keeps a refusal rate of at least ``safety_min`` (always, when it is 0)."""
        if self.safety_min <= 0:
            return True
        from ..safety import refusal_rate

        key = tuple(round(float(deltas[m].norm()), 6) for m in sorted(deltas))   # one check per merge
        if key not in self.refusals:
            with patched(self.model, deltas) as model:
                self.refusals[key] = refusal_rate(model, self.tokenizer, self.safety_prompts or None,
                                                  part=self.safety_part)
        return self.refusals[key] >= self.safety_min

    def __call__(self, deltas: dict, n: int) -> float:
        if not self.safe(deltas):
            return -math.inf
        scores = []
        for i in range(len(self.splits)):
            raw = self.task_score(i, deltas, n)
            if self.objective == "normalised":
                if (i, n) not in self.expert:
                    self.expert[(i, n)] = self.task_score(i, self.own[i], n)
                raw = raw / self.expert[(i, n)] if self.expert[(i, n)] else raw
            scores.append(raw)
        return float(np.nanmean(scores))


def recipe(ctx: MergeContext, method: str, parameters: dict) -> dict:
    """The winner as a ``orthomerge merge --config`` recipe (adapters by path; data specs when it needs data)."""
    spec = get_method(method)
    entries = []
    for a, w, item in zip(ctx.adapters, ctx.weights, ctx.data or [None] * len(ctx.adapters)):
        entry = {"path": str(a.path.resolve()) if a.path else None, "weight": w}
        if spec.needs_data:
            entry["data"] = getattr(item, "name", None)
        entries.append(entry)
    doc = {"method": method, "adapters": entries, "parameters": parameters, "seed": ctx.seed,
           "output": {"format": "peft"}}
    base = getattr(getattr(ctx.model, "config", None), "name_or_path", None)
    if base:
        doc["base_model"] = str(base)
    return doc


def _prepare(ctx: MergeContext) -> Prepared:
    p = ctx.params
    groups = grid(p["methods"], p["lambdas"], p["densities"])
    splits = [data_split(item, p["split"], int(p["samples"]), "search") for item in ctx.data]
    metrics = [getattr(item, "metric", "accuracy") for item in ctx.data]
    scorer = ValidationScorer(ctx, splits, metrics, int(p["max_length"]), int(p["batch_size"]), p["objective"],
                              float(p["safety_min"]), int(p["safety_prompts"]), p["safety_part"])

    def merge(method, params):
        extra = {"scale": 1.0} if "scale" in get_method(method).defaults else {}
        return ctx.merge_dense(method, {**params, **extra})

    rungs = fidelities(int(p["min_samples"]), max(len(s) for s in splits), float(p["eta"]))
    if p["strategy"] == "layerwise":
        candidates = [(method, params, lam) for method, params, lams in groups for lam in lams]
        found = layerwise_search(ctx, candidates, scorer, rungs, eta=float(p["eta"]), block=int(p["block"]),
                                 episodes=int(p["episodes"]), explore=float(p["explore"]), seed=ctx.seed)
        deltas, score, trials = found.deltas, found.score, [e.as_dict() for e in found.episodes]
        best = {"plan": found.plan, "score": score}
        doc = recipe(ctx, "layerwise", {"plan": found.plan})
        summary = f"search (layerwise): {len(found.plan)} layer choices (score {score:.4g})"
    else:
        outcome = successive_halving(groups, merge, scorer, rungs, float(p["eta"]))
        deltas, score, trials = outcome.deltas, outcome.score, [t.as_dict() for t in outcome.trials]
        method, params, lam = outcome.best
        best = {"method": method, "params": params, "lambda": lam, "score": score}
        doc = recipe(ctx, method, {**params, **({"scale": lam} if lam is not None else {})})
        summary = f"search: best {method} {params} λ={lam} (score {score:.4g})"
    if score == -math.inf:
        raise OrthomergeError(f"search: no candidate keeps the refusal rate at or above safety_min="
                              f"{p['safety_min']} (rates seen: {sorted(set(scorer.refusals.values()))})")
    extras = {m: {"update": Dense(deltas[m])} for m in ctx.modules}
    safety = ({"safety_min": p["safety_min"], "prompts": p["safety_prompts"], "part": p["safety_part"],
               "refusal_rates": sorted(scorer.refusals.values()),
               "rejected": sum(r < p["safety_min"] for r in scorer.refusals.values())}
              if p["safety_min"] > 0 else None)
    return Prepared(extras, {"search": {"strategy": p["strategy"], "best": best, "objective": p["objective"],
                                        "split": p["split"], "fidelities": rungs, "evaluations": scorer.calls,
                                        "rows_evaluated": scorer.rows, "trials": trials, "recipe": RECIPE_NAME,
                                        "safety": safety},
                             "summary": f"{summary}; recipe: {RECIPE_NAME}"},
                    files={RECIPE_NAME: yaml.safe_dump(doc, sort_keys=False)})


@register("search", space="dense", family="search", needs_data=True, prepare=_prepare,
          summary="search: method × hyper-parameters × λ for the whole model by successive halving, or per layer "
                  "(strategy=layerwise: a bandit per layer block on growing subsets) on validation rows; writes "
                  "OUT/recipe.yaml (needs the base model and task data)")
def search(updates: ModuleUpdates, methods: Union[str, list[str]] = DEFAULT_METHODS,
           lambdas: Union[str, float, list[float]] = "0.25,0.5,0.75,1.0,1.25",
           densities: Union[str, float, list[float]] = "0.1,0.2,0.4", min_samples: int = 16, eta: float = 3,
           samples: int = 0, split: Literal["validation", "train"] = "validation",
           objective: Literal["normalised", "raw"] = "normalised", max_length: int = 64, batch_size: int = 64,
           strategy: Literal["halving", "layerwise"] = "halving", block: int = 1, episodes: int = 16,
           explore: float = 1.0, safety_min: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0,
           safety_prompts: int = 22, safety_part: Literal["validation", "train", "test", "all"] = "validation"):
    """The winner's update for this module (task arithmetic at λ = 1 without a search result)."""
    if updates.extras and "update" in updates.extras:
        return updates.extras["update"]
    return task_arithmetic(updates, 1.0)
