"""mergekit-style YAML recipes: a declarative schema (pydantic), parsed into :func:`merge_adapters` arguments.

::

    method: ties                      # or merge_method
    base_model: minilm                # optional (default: the adapters' base_model_name_or_path)
    adapters:                         # or models; a path, or a mapping
      - path: runs/a                  # (or adapter / model)
        weight: 1.0
        parameters: {density: 0.3}    # per adapter: weight, density
        stats: stats/a.safetensors    # statistics-driven methods
        data: sst2                    # data-driven methods: a bundled task or tasks.yaml#name
      - runs/b
    parameters: {scale: 1.0}          # the method's hyper-parameters (see --list-methods)
    output: {format: peft, rank: 16, svd: auto, path: merged}
    seed: 0
    space: core                       # optional: the method's variant in this space

Relative paths are relative to the recipe's folder. Method parameters are validated by the method's own
typed signature (:meth:`~orthomerge.merge.registry.MethodSpec.resolve`), not here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import OrthomergeError
from ..outputs import check_output
from .engine import SVD_CHOICES, merge_adapters
from .registry import get_method
from .result import MergeResult

PER_ADAPTER_PARAMS = ("weight", "density")
Strict = ConfigDict(extra="forbid")


class AdapterEntry(BaseModel):
    model_config = Strict
    path: Optional[str] = None
    adapter: Optional[str] = None
    model: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    weight: Optional[float] = None
    stats: Optional[str] = None
    data: Optional[str] = None

    @property
    def location(self) -> str | None:
        return self.path or self.adapter or self.model


class Output(BaseModel):
    model_config = Strict
    format: Literal["peft", "dense"] = "peft"
    rank: Optional[int] = Field(default=None, ge=1)
    svd: Optional[Literal[SVD_CHOICES]] = None
    path: Optional[str] = None


class Recipe(BaseModel):
    model_config = Strict
    method: Optional[str] = None
    merge_method: Optional[str] = None
    adapters: Optional[list[Union[str, AdapterEntry]]] = None
    models: Optional[list[Union[str, AdapterEntry]]] = None
    parameters: Optional[dict[str, Any]] = None
    output: Optional[Output] = None
    base_model: Optional[str] = None
    model: Optional[str] = None
    seed: int = 0
    space: Optional[str] = None
    dtype: Optional[str] = None


def _schema_error(path: Path, err: ValidationError) -> OrthomergeError:
    """The first schema problem as one line: ``recipe.yaml: adapters[1]: unknown key 'foo'``."""
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [p for p in first["loc"] if isinstance(p, int) or p[:1].islower() and p not in ("str", "int", "float")]
    if first["type"] == "extra_forbidden":
        where = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(loc[:-1]))
        return OrthomergeError(f"{path}: {where + ': ' if where else ''}unknown key {loc[-1]!r}")
    where = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(loc))
    return OrthomergeError(f"{path}: {where}: {first['msg']}")


def parse_recipe(path: Path, doc) -> Recipe:
    """The YAML document checked against the schema (unknown keys and wrong types are one-line errors)."""
    if not isinstance(doc, dict):
        raise OrthomergeError(f"{path}: a recipe is a mapping with method, adapters, parameters, output")
    try:
        return Recipe.model_validate(doc)
    except ValidationError as err:
        raise _schema_error(path, err) from None


def load_recipe(path: str | Path) -> dict:
    """Parse a recipe into :func:`merge_adapters` arguments (+ ``out``, ``adapters`` and ``params``)."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise OrthomergeError(f"{path}: missing") from None
    except yaml.YAMLError as err:
        raise OrthomergeError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    recipe = parse_recipe(path, doc)
    method = recipe.method or recipe.merge_method
    if not method:
        raise OrthomergeError(f"{path}: no 'method'")
    entries = recipe.adapters or recipe.models
    if not entries:
        raise OrthomergeError(f"{path}: 'adapters' must be a non-empty list")
    here = path.parent

    def local(p) -> Path:
        p = Path(str(p)).expanduser()
        return p if p.is_absolute() else here / p

    adapters, per, stats, data = [], {k: [] for k in PER_ADAPTER_PARAMS}, [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = AdapterEntry(path=entry)
        if not entry.location:
            raise OrthomergeError(f"{path}: adapters[{i}] has no path")
        adapters.append(local(entry.location))
        params = dict(entry.parameters or {})
        if entry.weight is not None:
            params["weight"] = entry.weight
        bad = sorted(set(params) - set(PER_ADAPTER_PARAMS))
        if bad:
            raise OrthomergeError(f"{path}: adapters[{i}]: per-adapter parameter {bad[0]!r} is not supported "
                                  f"(per adapter: {', '.join(PER_ADAPTER_PARAMS)}; others go in 'parameters')")
        for k in PER_ADAPTER_PARAMS:
            per[k].append(params.get(k))
        stats.append(local(entry.stats) if entry.stats else None)
        if entry.data:   # a bundled task name, or a tasks YAML relative to the recipe
            file, sep, name = entry.data.partition("#")
            data.append(str(local(file)) + sep + name if local(file).exists() else entry.data)
        else:
            data.append(None)
    glob = dict(recipe.parameters or {})
    kwargs = {"method": method, "space": recipe.space, "seed": recipe.seed}
    if any(w is not None for w in per["weight"]):
        kwargs["weights"] = [1.0 if w is None else w for w in per["weight"]]
    if "weight" in glob:
        raise OrthomergeError(f"{path}: 'weight' is per adapter, not a global parameter")
    if any(d is not None for d in per["density"]):
        default = glob.get("density", get_method(method, recipe.space).defaults.get("density"))
        glob["density"] = [default if d is None else d for d in per["density"]]
    for key, values in (("stats", stats), ("data", data)):
        if any(v is not None for v in values):
            if not all(values):
                raise OrthomergeError(f"{path}: give '{key}' for every adapter or none")
            kwargs[key] = values
    output = recipe.output or Output()
    kwargs["dense"] = output.format == "dense"
    if output.rank is not None:
        kwargs["rank"] = output.rank
    if output.svd:
        kwargs["svd"] = output.svd
    base = recipe.base_model or recipe.model
    if base:
        kwargs["model"] = str(local(base)) if local(base).exists() else str(base)
    kwargs["out"] = local(output.path) if output.path else None
    kwargs["adapters"] = adapters
    kwargs["params"] = glob
    return kwargs


def run_recipe(yaml_path: str | Path, out: str | Path | None = None, progress: bool = False,
               threads: int | None = None, overwrite: bool = False) -> MergeResult:
    """Merge as a YAML recipe says and save to ``out`` (or the recipe's ``output.path``)."""
    kwargs = load_recipe(yaml_path)
    target = out or kwargs.pop("out")
    kwargs.pop("out", None)
    if target is None:
        raise OrthomergeError(f"{yaml_path}: no output path (output.path in the recipe, or out=)")
    params = kwargs.pop("params")
    adapters = kwargs.pop("adapters")
    check_output(target, overwrite=overwrite, inputs=[yaml_path, *adapters])
    result = merge_adapters(adapters, progress=progress, threads=threads, **kwargs, **params)
    result.report["recipe"] = str(yaml_path)
    result.save(target, overwrite=overwrite)
    return result
