"""Reusing what was computed before: content keys, and the one cache of activation statistics.

The experiment (``RUN/stats/``) and ``orthomerge train`` / ``eval`` (``$ORTHOMERGE_CACHE/stats/``) both
go through :func:`cached_stats`, so a statistics file is reused only when it was computed from the same
model, targets, ``max_length`` and rows.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from .config import DEFAULT_DTYPE
from .models import load_model, load_tokenizer
from .stats import collect_stats, load_stats, save_stats


def digest(obj) -> str:
    """A short content key: SHA-1 of ``obj`` as sorted-key JSON (other types by ``str``), 12 hex digits."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def precision_key(dtype: str) -> list[str]:
    """The base's precision as part of a cache key: nothing for the default, so keys written before
    precision was part of them stay valid; ``[dtype]`` otherwise."""
    return [] if dtype == DEFAULT_DTYPE else [dtype]


def stats_key(model_spec: str, targets: list[str], max_length: int, data, dtype: str = DEFAULT_DTYPE) -> str:
    """What statistics of ``data`` (a :class:`~orthomerge.tasks.Split`) depend on: the model, the targets,
    ``max_length``, the rows' texts (and second texts) and the base's precision (:func:`precision_key`)."""
    return digest([model_spec, targets, max_length, data.texts, data.pairs] + precision_key(dtype))


def cached_stats(folder: str | Path, model_spec: str, data, targets: list[str], max_length: int, *,
                 name: str | None = None, base: Callable | None = None, dtype: str = DEFAULT_DTYPE):
    """Statistics of ``data`` on the pre-trained model, read from ``folder/<name>.safetensors`` when that
    file's key (``meta["data"]``, :func:`stats_key`) matches, else computed and written there.

    ``name``: the file's name (default: the key itself). ``base``: a callable returning ``(model,
    tokenizer)``, called only when the statistics must be computed (default: load ``model_spec`` in
    ``dtype``); ``dtype``: the precision ``base`` loads the model in (part of the key)."""
    key = stats_key(model_spec, targets, max_length, data, dtype)
    path = Path(folder) / f"{name or key}.safetensors"
    if path.exists():
        cached = load_stats(path)
        if cached.meta.get("data") == key:
            return cached
    model, tokenizer = (base or loaded_once(model_spec, dtype=dtype))()
    stats = collect_stats(model, tokenizer, data.texts, targets, pairs=data.pairs, max_length=max_length,
                          progress=False, model_name=model_spec)
    stats.meta["data"] = key
    save_stats(stats, path)
    return stats


def loaded_once(model_spec: str, **placement) -> Callable:
    """A ``base`` for :func:`cached_stats` that loads ``model_spec`` (and its tokenizer) on first use only;
    ``placement``: ``task_type``, ``device``, ``dtype`` for :func:`~orthomerge.models.load_model`."""
    loaded = []

    def base():
        if not loaded:
            loaded.append((load_model(model_spec, **placement), load_tokenizer(model_spec)))
        return loaded[0]

    return base
