"""The merging suite: pure per-module rules in a registry, and the engine that runs them over adapters.

>>> from orthomerge.merge import merge_adapters, run_recipe, list_methods
>>> result = merge_adapters(["ft1", "ft2"], method="ties", density=0.2)
>>> result.save("merged")

Modules: :mod:`.registry` (what a rule sees/returns, typed hyper-parameters, hooks), :mod:`.inputs`
(validation), :mod:`.engine` (the per-module loop), :mod:`.result` (output folders), :mod:`.recipe`
(YAML recipes), :mod:`.recompress` (exact low-rank algebra), :mod:`.data` (data-driven plumbing).
Importing this package registers every method (``linear``, ``elementwise``, ``spectral``, ``regmean``,
``emr``, ``subspace``, ``continual``, ``do_merging``, ``doge``; data-driven ``fisher``, ``adamerging``,
``search``).
"""
from . import (adamerging, continual, do_merging, doge, elementwise, emr, fisher, layerwise, linear,  # noqa: F401
               regmean, search, spectral, subspace)  # (registration)
from .engine import merge_adapters
from .recipe import load_recipe, run_recipe
from .registry import METHODS, get_method, list_methods, register
from .result import REPORT_NAME, MergeResult

__all__ = ["METHODS", "MergeResult", "REPORT_NAME", "get_method", "list_methods", "load_recipe", "merge_adapters",
           "register", "run_recipe"]
