"""orthomerge: make LoRA adapters mergeable (OSRM) and merge them exactly in low-rank form.

The public API, imported on first use (``import orthomerge`` itself loads no torch):

* :func:`load_adapter` — read a PEFT LoRA folder (:mod:`orthomerge.adapters`);
* :func:`collect_stats` — activation statistics of the target modules' inputs (:mod:`orthomerge.stats`);
* :func:`osrm_init` — OSRM-initialise a freshly wrapped ``PeftModel`` in place (:mod:`orthomerge.osrm`);
* :func:`merge_adapters` — merge adapters with any registered method (:mod:`orthomerge.merge`).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_adapter": "orthomerge.adapters",
    "collect_stats": "orthomerge.stats",
    "osrm_init": "orthomerge.osrm",
    "merge_adapters": "orthomerge.merge",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value   # later lookups skip this function
        return value
    raise AttributeError(f"module 'orthomerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
