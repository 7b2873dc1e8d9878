"""The method registry and the per-module objects a merge rule sees.

A method is a small pure function ``fn(task: ModuleTask, **params) -> LowRank | Dense | PerTask``
registered by name (mergekit style)::

    @register("ties", space="dense", family="elementwise", defaults={"density": 0.2, ...},
              summary="TIES-Merging on dense ΔW: trim, elect sign, disjoint mean")
    def ties(task, density, ...): ...

It sees tensors only — scale-folded factors ``(B_i' = s_i·B_i, A_i)`` in float32, the weights, per-task
seeds and (for data-driven rules) Gram matrices — and knows nothing about files, models or the CLI;
:mod:`orthomerge.merge.api` does file handling, module iteration and heads.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import OrthomergeError

SPACES = ("factored", "dense", "core", "knots")

# ---------------------------------------------------------------- what a rule sees


@dataclass
class ModuleTask:
    """One linear module of every task: ``ΔW_i = B_i' @ A_i`` (scale folded, float32), weights ``w_i``.

    ``seeds[i]`` is tied to (adapter i's content, module), never to the position i, so random rules do
    not depend on the adapters' order. ``grams[i]`` (float64 [n, n]) and ``tokens[i]`` are the
    statistics of task i's inputs to this module, for data-driven rules.
    """

    name: str
    factors: list[tuple[torch.Tensor, torch.Tensor]]
    weights: list[float]
    seeds: list[int] = field(default_factory=list)
    grams: list[torch.Tensor] | None = None
    tokens: list[int] | None = None
    extras: dict | None = None   # per-module inputs a method's ``prepare`` computed (Fisher, learned λ, …)

    def __len__(self) -> int:
        return len(self.factors)

    @property
    def shape(self) -> tuple[int, int]:
        b, a = self.factors[0]
        return b.shape[0], a.shape[1]

    @property
    def ranks(self) -> list[int]:
        return [a.shape[0] for _, a in self.factors]

    def full(self, i: int) -> torch.Tensor:
        """A fresh dense ``ΔW_i`` (float32); the caller owns it and may modify it in place."""
        b, a = self.factors[i]
        return b @ a

    def rows(self, i: int, start: int, stop: int) -> torch.Tensor:
        b, a = self.factors[i]
        return b[start:stop] @ a


@dataclass
class DenseTasks:
    """Same interface as :class:`ModuleTask` over explicit matrices (core / KnOTS coordinates)."""

    mats: list[torch.Tensor]
    weights: list[float]
    seeds: list[int] = field(default_factory=list)
    name: str = ""

    def __len__(self) -> int:
        return len(self.mats)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mats[0].shape)

    def full(self, i: int) -> torch.Tensor:
        return self.mats[i].to(torch.float32).clone()

    def rows(self, i: int, start: int, stop: int) -> torch.Tensor:
        return self.mats[i][start:stop].to(torch.float32)


# ---------------------------------------------------------------- what a rule returns


@dataclass
class LowRank:
    """An exact low-rank update ``ΔW = B @ A`` (scaling 1)."""

    B: torch.Tensor
    A: torch.Tensor


@dataclass
class Dense:
    """A dense update ``ΔW`` (generally full rank: re-compressed with a reported error, or written dense)."""

    delta: torch.Tensor


@dataclass
class PerTask:
    """One update per task (EMR): ``updates[i]`` is task i's update before its rescaler.

    ``numer[i] / denom[i]`` is this module's share of task i's rescaler; the API applies it per module
    or summed over the model (``rescale_scope``).
    """

    updates: list[Dense | LowRank]
    numer: list[float]
    denom: list[float]


def module_seed(seed: int, key: str, module: str) -> int:
    """A seed from (global seed, the adapter's key, module name): order-independent, reproducible."""
    digest = hashlib.sha256(f"{seed}|{key}|{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**62)


def scaled_factors(adapters, module: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(s·B, A)`` of ``module`` for every adapter, float32: what a rule sees."""
    return [(a.B[module].to(torch.float32) * a.scaling[module], a.A[module].to(torch.float32)) for a in adapters]


@dataclass
class MergeContext:
    """What a method's ``prepare`` sees: the whole merge (not one module).

    ``adapters`` are :class:`orthomerge.adapters.LoraAdapter`; ``data[i]`` is adapter i's task data (a
    :class:`orthomerge.tasks.Task` or :class:`~orthomerge.tasks.Split`; ``None`` for data-free methods);
    ``model`` the base model (``None`` when unknown), ``params`` the resolved hyper-parameters.
    """

    adapters: list
    names: list[str]
    modules: list[str]
    weights: list[float]
    params: dict
    model: object = None
    data: list | None = None
    tokenizer: object = None
    stats: list | None = None
    seed: int = 0
    progress: bool = False
    keys: list[str] = field(default_factory=list)   # per adapter: its seeding identity (see module_seed)

    def module_task(self, module: str) -> ModuleTask:
        """``module`` of every adapter as the per-module loop sees it (no seeds, statistics or extras)."""
        return ModuleTask(name=module, factors=scaled_factors(self.adapters, module), weights=list(self.weights))

    def get_tokenizer(self):
        """The tokenizer given to the merge, else the base model's (by its ``name_or_path``)."""
        if self.tokenizer is None:
            from ..models import load_tokenizer

            spec = getattr(getattr(self.model, "config", None), "name_or_path", None)
            if not spec:
                raise OrthomergeError("data-driven merge: no tokenizer (pass tokenizer= or a model folder)")
            self.tokenizer = load_tokenizer(str(spec))
        return self.tokenizer


@dataclass
class Prepared:
    """A ``prepare`` result: ``extras[module]`` for the rule, ``report`` for merge_report.json."""

    extras: dict[str, dict] = field(default_factory=dict)
    report: dict = field(default_factory=dict)


# ---------------------------------------------------------------- registry


@dataclass
class MethodSpec:
    name: str
    fn: Callable
    space: str
    family: str
    summary: str
    defaults: dict
    base: str
    random: bool = False
    linear: bool = False
    needs_stats: bool = False
    per_task: bool = False
    needs_data: bool = False
    prepare: Callable | None = None
    choices: dict = field(default_factory=dict)

    def resolve(self, params: dict) -> dict:
        """Defaults overridden by ``params``; unknown names are an error."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise OrthomergeError(f"method {self.name!r}: unknown parameter {unknown[0]!r} (allowed: {allowed})")
        return {**self.defaults, **params}


METHODS: dict[str, MethodSpec] = {}


def register(name: str, *, space: str, family: str, summary: str, defaults: dict | None = None,
             base: str | None = None, random: bool = False, linear: bool = False, needs_stats: bool = False,
             per_task: bool = False, needs_data: bool = False, prepare: Callable | None = None,
             choices: dict | None = None):
    """Decorator: register ``fn`` under ``name``. ``defaults`` lists every hyper-parameter it accepts.

    Model-level methods give ``prepare(ctx: MergeContext) -> Prepared``: it runs once before the
    per-module loop (with every adapter, the base model and, for ``needs_data`` methods, each adapter's
    task data) and returns per-module ``extras`` that the rule finds in ``ModuleTask.extras``.
    ``choices`` maps a non-numeric parameter to its allowed values (a tuple) or type (e.g. ``str``).
    """
    if space not in SPACES:
        raise ValueError(f"space {space!r} not in {SPACES}")

    def wrap(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        params = defaults
        if params is None:
            sig = inspect.signature(fn)
            params = {k: p.default for k, p in list(sig.parameters.items())[1:]
                      if p.default is not inspect.Parameter.empty}
        METHODS[name] = MethodSpec(name=name, fn=fn, space=space, family=family, summary=summary,
                                   defaults=dict(params), base=base or name, random=random, linear=linear,
                                   needs_stats=needs_stats, per_task=per_task, needs_data=needs_data,
                                   prepare=prepare, choices=dict(choices or {}))
        return fn

    return wrap


def get_method(name: str, space: str | None = None) -> MethodSpec:
    """The method called ``name``, or the variant of base rule ``name`` in ``space`` (never substituted)."""
    if space is not None:
        if space not in SPACES:
            raise OrthomergeError(f"--space {space!r}: choose one of {', '.join(SPACES)}")
        base = METHODS[name].base if name in METHODS else name
        hits = [m for m in METHODS.values() if m.base == base and m.space == space]
        if not hits:
            have = sorted({m.space for m in METHODS.values() if m.base == base}) or ["none"]
            raise OrthomergeError(
                f"method {name!r} has no {space}-space variant (available spaces: {', '.join(have)})")
        return hits[0]
    if name not in METHODS:
        raise OrthomergeError(f"unknown merge method {name!r} (see --list-methods): "
                              f"{', '.join(sorted(METHODS))}")
    return METHODS[name]


def list_methods() -> list[str]:
    """One line per registered method: name, space, summary."""
    width = max(len(n) for n in METHODS)
    return [f"{m.name:<{width}}  [{m.space}] {m.summary}" for m in sorted(METHODS.values(), key=lambda m: m.name)]


def per_task(value, count: int, what: str) -> list[float]:
    """A scalar or a per-task list, as a list of ``count`` floats."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise OrthomergeError(f"{what}: {len(value)} values for {count} adapters")
        return [float(v) for v in value]
    return [float(value)] * count
