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
             per_task: bool = False):
    """Decorator: register ``fn`` under ``name``. ``defaults`` lists every hyper-parameter it accepts."""
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
                                   needs_stats=needs_stats, per_task=per_task)
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
