"""What a merge reads, checked before any expensive work: adapters, weights, statistics, task data, the base.

Every problem is one line naming the file and what is wrong; nothing here knows a merge method by name.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from ..adapters import WEIGHTS_NAME, LoraAdapter, load_adapter
from ..errors import OrthomergeError
from ..linalg import all_finite


def where(adapter: LoraAdapter) -> str:
    """The adapter's weights file (or its name, in memory), for error messages."""
    return str(adapter.path / WEIGHTS_NAME) if adapter.path else adapter.name


def load_adapters(adapters) -> list[LoraAdapter]:
    """Folders or :class:`LoraAdapter` objects, loaded; NaN or Inf factors are refused."""
    if not adapters:
        raise OrthomergeError("no adapters to merge")
    out = []
    for item in adapters:
        adapter = item if isinstance(item, LoraAdapter) else load_adapter(item)
        for module in adapter.modules:
            for which, t in (("lora_A", adapter.A[module]), ("lora_B", adapter.B[module])):
                if not all_finite(t):
                    raise OrthomergeError(f"{where(adapter)}: {module}.{which} contains NaN or Inf")
        out.append(adapter)
    return out


def check_weights(weights, count: int) -> list[float]:
    """One finite weight per adapter (default 1 each)."""
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise OrthomergeError(f"weights: {len(weights)} weights for {count} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise OrthomergeError("weights: weights must be finite numbers")
    return weights


def validate_compatible(adapters: list[LoraAdapter]) -> None:
    """Same base model name, same modules, same shapes — else one line naming the file and the problem."""
    first = adapters[0]
    base0 = first.config.get("base_model_name_or_path")
    for other in adapters[1:]:
        if other.task_type != first.task_type:
            raise OrthomergeError(f"{other.path or other.name}: task type {other.task_type!r} differs from "
                                  f"{first.task_type!r} of {first.path or first.name}")
        base = other.config.get("base_model_name_or_path")
        if base0 and base and base != base0:
            raise OrthomergeError(f"{other.path or other.name}: base model {base!r} differs from {base0!r} "
                                  f"of {first.path or first.name}")
        extra = sorted(set(other.modules) ^ set(first.modules))
        if extra:
            who = other if extra[0] in other.A else first
            raise OrthomergeError(f"{where(who)}: target module {extra[0]!r} is not in every adapter "
                                  "(all adapters must adapt the same modules)")
        for m in first.modules:
            s0 = (first.B[m].shape[0], first.A[m].shape[1])
            s1 = (other.B[m].shape[0], other.A[m].shape[1])
            if s0 != s1:
                raise OrthomergeError(f"{where(other)}: {m} is {s1[0]}×{s1[1]}, "
                                      f"{first.path or first.name} has {s0[0]}×{s0[1]}")


def task_names(adapters: list[LoraAdapter]) -> list[str]:
    """Folder names for ``tasks/``: the adapter folder names, made unique with ``-2``, ``-3``…"""
    names, seen = [], {}
    for i, a in enumerate(adapters):
        base = a.path.name if a.path else f"task{i}"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def adapter_keys(adapters: list[LoraAdapter], names: list[str]) -> list[str]:
    """A stable identity per adapter for seeding random rules: its task name when it was read from a
    folder (so numerically equal runs give equal masks, whatever the adapters' order or last bits),
    else a digest of its factors (an in-memory adapter has no name of its own)."""
    keys = []
    for adapter, name in zip(adapters, names):
        if adapter.path is not None:
            keys.append(name)
            continue
        h = hashlib.sha256()
        for m in sorted(adapter.modules):
            for t in (adapter.A[m], adapter.B[m]):
                h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
        keys.append(h.hexdigest())
    return keys


def load_stats(stats, adapters, modules, method: str) -> list[tuple]:
    """``[(source, statistics)]``, one per adapter, each with a Gram matrix for every module."""
    if stats is None:
        raise OrthomergeError(f"{method} needs statistics: one statistics file per adapter (orthomerge stats)")
    if len(stats) != len(adapters):
        raise OrthomergeError(f"stats: {len(stats)} files for {len(adapters)} adapters")
    loaded = []
    for item in stats:
        if isinstance(item, (str, Path)):
            from ..stats import load_stats as read   # lazy: only statistics-driven methods need it
            st = read(item)
        else:
            st = item
        missing = [m for m in modules if m not in set(st.modules)]
        if missing:
            raise OrthomergeError(f"{item if isinstance(item, (str, Path)) else 'statistics'}: no Gram matrix "
                                  f"for module {missing[0]!r}")
        loaded.append((item, st))
    return loaded


def module_grams(loaded: list[tuple], module: str, n: int) -> tuple[list[torch.Tensor], list[int]]:
    """Every task's Gram matrix of ``module`` (checked: n×n, finite) and its token count."""
    grams = []
    for source, st in loaded:
        g = st.gram(module)
        if tuple(g.shape) != (n, n):
            raise OrthomergeError(f"{source}: Gram of {module} is {tuple(g.shape)}, expected ({n}, {n})")
        if not all_finite(g):
            raise OrthomergeError(f"{source}: Gram of {module} contains NaN or Inf")
        grams.append(g)
    return grams, [st.tokens(module) for _, st in loaded]


def resolve_model(model, adapters, notes: list, *, weights: bool, tokenizer: bool, why: str | None, device=None):
    """``None`` → the adapters' base, loaded as their task type.

    ``weights``: the merge reads base weights (dense output, data-driven methods, trained biases; ``why``
    says which); otherwise the model is built from its config on the meta device, which is all that
    validating module names and shapes needs. ``tokenizer``: the model will see text (pad token needed).
    ``device``: where a loaded model is placed (default the CPU).
    """
    if model is not None and not isinstance(model, str):
        return model
    from ..models import class_for_modules, load_model

    spec = model or adapters[0].config.get("base_model_name_or_path")
    if not spec:
        if why:
            raise OrthomergeError(f"{why} needs the base model: pass model= (a folder or bundled name)")
        notes.append("base model unknown: adapters validated against each other only")
        return None
    try:
        task_type = adapters[0].task_type
        model_class = class_for_modules(spec, adapters[0].modules) if task_type is None else None
        return load_model(spec, num_labels=adapters[0].num_labels() or 2, task_type=task_type,
                          weights=weights, pad_from_tokenizer=tokenizer, model_class=model_class, device=device)
    except OrthomergeError:
        if model is not None or why:
            raise
        notes.append(f"base model {spec!r} not found locally: adapters validated against each other only")
        return None


def load_data(data, adapters) -> list | None:
    """One :class:`Task` or :class:`Split` per adapter from tasks, splits, bundled names or tasks YAML files."""
    from ..tasks import Split, Task, load_task, load_tasks

    if data is None:
        return None
    if isinstance(data, (str, Path, Split, Task)):
        data = [data]
    data = list(data)
    if len(data) != len(adapters):
        raise OrthomergeError(f"data: {len(data)} items for {len(adapters)} adapters (one task per adapter)")
    out = []
    for item in data:
        if isinstance(item, (Split, Task)):
            out.append(item)
            continue
        text = str(item)
        path, _, name = text.partition("#")
        if path.lower().endswith((".yaml", ".yml")):
            tasks = load_tasks([path])
            hits = [t for t in tasks if t.name == name] if name else tasks
            if len(hits) != 1:
                names = ", ".join(t.name for t in tasks)
                raise OrthomergeError(f"data {text}: name one task of {path} with {path}#NAME (tasks: {names})")
            out.append(hits[0])
        else:
            out.append(load_task(text))
    return out
