"""The merging suite: pure per-module rules in a registry, and the API that runs them over adapters.

>>> from orthomerge.merge import merge_adapters, run_recipe, list_methods
>>> result = merge_adapters(["ft1", "ft2"], method="ties", density=0.2)
>>> result.save("merged")

Importing this package registers every method (``linear``, ``elementwise``, ``spectral``, ``regmean``,
``emr``, ``subspace``, ``continual``, ``do_merging``, ``doge``; data-driven ``fisher``, ``adamerging``,
``search``).
"""
from . import (adamerging, continual, do_merging, doge, elementwise, emr, fisher, linear, regmean,  # noqa: F401
               search, spectral, subspace)  # (registration)
from .api import MergeResult, merge_adapters, run_recipe
from .registry import METHODS, get_method, list_methods, register

__all__ = ["METHODS", "MergeResult", "get_method", "list_methods", "merge_adapters", "register", "run_recipe"]
