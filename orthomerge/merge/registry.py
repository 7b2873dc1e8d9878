"""The method registry and what a merge rule sees and returns.

A method is a small pure function over one module's updates, registered by name (mergekit style). Its
typed keyword parameters *are* its hyper-parameters: defaults, validation (pydantic, strict), the CLI's
``--set``, recipe ``parameters`` and ``--list-methods`` all derive from the signature, so each exists once::

    @register("ties", space="dense", family="elementwise", summary="TIES-Merging on dense ΔW")
    def ties(updates: ModuleUpdates, density: Density = 0.2,
             sign: Literal["total", "frequency"] = "total", ...) -> Dense: ...

A rule sees tensors only — scale-folded factors ``(B_i' = s_i·B_i, A_i)`` in float32, the weights, per-task
seeds and (for data-driven rules) Gram matrices — and knows nothing about files, models or the CLI.
Model-level steps are the method's own hooks: ``prepare(ctx) -> Prepared`` runs before the per-module loop
(its per-module ``extras`` reach the rule as ``updates.extras``) and ``finalize(ctx, info) -> Finalized``
after it. The engine (:mod:`orthomerge.merge.engine`) calls them and names no method.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal, Union

import torch
from pydantic import ConfigDict, Field, ValidationError, create_model

from ..errors import OrthomergeError

SPACES = ("factored", "dense", "core", "knots")

# ---------------------------------------------------------------- what a rule sees


@dataclass
class ModuleUpdates:
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
        """(m, n) of one module's ΔW (also for a batched rule's [k, m, r] / [k, r, n] factors)."""
        b, a = self.factors[0]
        return b.shape[-2], a.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.factors[0][1].device

    def full(self, i: int) -> torch.Tensor:
        """A fresh dense ``ΔW_i`` (float32); the caller owns it and may modify it in place."""
        b, a = self.factors[i]
        return b @ a

    def rows(self, i: int, start: int, stop: int) -> torch.Tensor:
        b, a = self.factors[i]
        return b[start:stop] @ a


@dataclass
class DenseUpdates:
    """Same interface as :class:`ModuleTask` over explicit matrices (core / KnOTS coordinates)."""

    mats: list[torch.Tensor]
    weights: list[float]
    seeds: list[int] = field(default_factory=list)
    name: str = ""

    def __len__(self) -> int:
        return len(self.mats)

    @property
    def device(self) -> torch.device:
        return self.mats[0].device

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
    """One update per task (e.g. EMR): ``updates[i]`` is task i's update; ``info`` is whatever the method's
    ``finalize`` hook needs from this module (EMR: its share of each task's rescaler)."""

    updates: list[Dense | LowRank]
    info: object = None


def module_seed(seed: int, key: str, module: str) -> int:
    """A seed from (global seed, the adapter's key, module name): order-independent, reproducible."""
    digest = hashlib.sha256(f"{seed}|{key}|{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**62)


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
    merge_dense: Callable | None = None   # (method, params) -> {module: ΔW}: another merge of these adapters

    @functools.cached_property
    def keys(self) -> list[str]:
        """Per adapter: its seeding identity (see :func:`module_seed`), computed on first use only (it hashes
        the factors of an adapter held in memory; most methods draw nothing at random)."""
        from .inputs import adapter_keys

        return adapter_keys(self.adapters, self.names)

    def get_tokenizer(self):
        """The tokenizer given to the merge, else the base model's (by its ``name_or_path``)."""
        if self.tokenizer is None:
            from ..models import load_tokenizer

            spec = getattr(getattr(self.model, "config", None), "name_or_path", None)
            if not spec:
                raise OrthomergeError("data-driven merge: no tokenizer (pass tokenizer= or a model folder)")
            self.tokenizer = load_tokenizer(str(spec))
        return self.tokenizer


# ---------------------------------------------------------------- hook results


@dataclass
class Prepared:
    """A ``prepare`` result: ``extras[module]`` for the rule, ``report`` entries for merge_report.json and
    ``files`` (name → text) written next to it in the output folder."""

    extras: dict[str, dict] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class Finalized:
    """A ``finalize`` result: ``scales[module][k]`` multiplies output k's update of that module (outputs
    in order: the one merged update, or one per task), and ``report`` entries for merge_report.json."""

    scales: dict[str, list[float]] = field(default_factory=dict)
    report: dict = field(default_factory=dict)


# ---------------------------------------------------------------- typed hyper-parameters

Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
Density = Union[Fraction, list[Fraction]]   # one value, or one per adapter (a recipe's per-adapter density)
PARAMS_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)


def _hyper_parameters(fn: Callable) -> dict[str, tuple[object, object]]:
    """``{name: (annotation, default)}`` for every keyword parameter after the first (the updates)."""
    hints = typing.get_type_hints(inspect.unwrap(fn), include_extras=True)   # a wrapper's are its target's
    params = list(inspect.signature(fn).parameters.values())[1:]
    missing = [p.name for p in params if p.default is inspect.Parameter.empty or p.name not in hints]
    if missing:
        raise ValueError(f"{fn.__name__}: parameter {missing[0]!r} needs a type annotation and a default")
    return {p.name: (hints[p.name], p.default) for p in params}


def _type_name(annotation) -> str:
    """A short readable form of a parameter's type for ``--list-methods``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return getattr(annotation, "__name__", str(annotation))


# ---------------------------------------------------------------- registry


@dataclass
class MethodSpec:
    """A registered method: its rule, hooks and what it needs; hyper-parameters come from ``fn``'s signature."""

    name: str
    fn: Callable
    space: str
    family: str
    summary: str
    base: str
    random: bool = False
    linear: bool = False
    needs_stats: bool = False
    per_task: bool = False       # one update per task (no single merged model)
    needs_data: bool = False
    batch_fn: Callable | None = None   # the rule over many modules of one shape at once (see ``register``)
    prepare: Callable | None = None
    finalize: Callable | None = None
    params: dict = field(default_factory=dict)   # name -> (annotation, default)
    schema: type | None = None                     # pydantic model of the hyper-parameters

    @property
    def defaults(self) -> dict:
        return {k: default for k, (_, default) in self.params.items()}

    def resolve(self, params: dict) -> dict:
        """Defaults overridden by ``params``, validated against the signature's types (one-line errors)."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            allowed = ", ".join(sorted(self.params)) or "none"
            raise OrthomergeError(f"method {self.name!r}: unknown parameter {unknown[0]!r} (allowed: {allowed})")
        resolved = {**self.defaults, **params}
        try:
            self.schema.model_validate(resolved)
        except ValidationError as err:
            first = err.errors()[0]
            key = first["loc"][0]
            raise OrthomergeError(f"{self.name}: parameter {key}={resolved[key]!r}: {first['msg']}") from None
        return resolved

    def describe(self) -> str:
        """``name=default (type)`` for every hyper-parameter."""
        return ", ".join(f"{k}={d!r} ({_type_name(a)})" for k, (a, d) in self.params.items()) or "no parameters"


METHODS: dict[str, MethodSpec] = {}
DEFAULT_METHOD = "task_arithmetic"   # what merge_adapters runs when no method is named


def register(name: str, *, space: str, family: str, summary: str, base: str | None = None, random: bool = False,
             linear: bool = False, needs_stats: bool = False, per_task: bool = False, needs_data: bool = False,
             batched: bool = False, prepare: Callable | None = None, finalize: Callable | None = None):
    """Decorator: register ``fn(updates, **hyper_parameters)`` under ``name``.

    Every parameter after the first is a hyper-parameter and needs a type annotation and a default (use
    ``Literal[...]`` for a choice). ``prepare(ctx: MergeContext) -> Prepared`` runs once before the
    per-module loop (with every adapter, the base model and, for ``needs_data`` methods, each adapter's
    task data); ``finalize(ctx, info) -> Finalized`` once after it, with ``info[module]`` = the rule's
    ``PerTask.info``.

    ``batched=True``: ``fn`` merges k modules of one shape at once — the factors carry a leading module
    dimension (``B_i`` [k, m, r_i], ``A_i`` [k, r_i, n]; no seeds, statistics or extras) and it returns one
    :class:`LowRank` per module — so the engine pays the Python and LAPACK-call overhead once per shape
    instead of once per module. The registered ``fn`` (what a caller of one module uses) wraps it for a
    single module; the engine calls the batched rule.
    """
    if space not in SPACES:
        raise ValueError(f"space {space!r} not in {SPACES}")
    if batched and (random or needs_stats or per_task or prepare or finalize):
        raise ValueError(f"merge method {name!r}: a batched rule gets no seeds, statistics, per-task "
                         "results or prepared extras")

    def wrap(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        params = _hyper_parameters(fn)
        schema = create_model(f"{name}_parameters", __config__=PARAMS_CONFIG, **params)
        one = functools.wraps(fn)(functools.partial(_one_module, fn)) if batched else fn
        METHODS[name] = MethodSpec(name=name, fn=one, space=space, family=family, summary=summary, base=base or name,
                                   random=random, linear=linear, needs_stats=needs_stats, per_task=per_task,
                                   needs_data=needs_data, batch_fn=fn if batched else None, prepare=prepare,
                                   finalize=finalize, params=params, schema=schema)
        return one

    return wrap


def _one_module(batched: Callable, updates: ModuleUpdates, *args, **params):
    """A batched rule applied to one module (a batch of one)."""
    single = dataclasses.replace(updates, factors=[(b[None], a[None]) for b, a in updates.factors])
    return batched(single, *args, **params)[0]


def get_method(name: str, space: str | None = None) -> MethodSpec:
    """The method called ``name``, or the variant of base rule ``name`` in ``space`` (never substituted)."""
    if space is not None:
        if space not in SPACES:
            raise OrthomergeError(f"space {space!r}: choose one of {', '.join(SPACES)}")
        base = METHODS[name].base if name in METHODS else name
        hits = [m for m in METHODS.values() if m.base == base and m.space == space]
        if not hits:
            have = sorted({m.space for m in METHODS.values() if m.base == base}) or ["none"]
            raise OrthomergeError(
                f"method {name!r} has no {space}-space variant (available spaces: {', '.join(have)})")
        return hits[0]
    if name not in METHODS:
        raise OrthomergeError(f"unknown merge method {name!r}: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def list_methods(params: bool = True) -> list[str]:
    """One line per registered method: name, space, summary (and, indented, its hyper-parameters)."""
    width = max(len(n) for n in METHODS)
    lines = []
    for m in sorted(METHODS.values(), key=lambda m: m.name):
        lines.append(f"{m.name:<{width}}  [{m.space}] {m.summary}")
        if params:
            lines.append(f"{'':<{width}}    {m.describe()}")
    return lines


def broadcast(value, count: int, what: str) -> list[float]:
    """A scalar or a per-task list, as a list of ``count`` floats."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise OrthomergeError(f"{what}: {len(value)} values for {count} adapters")
        return [float(v) for v in value]
    return [float(value)] * count
