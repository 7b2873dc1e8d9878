"""The package's public surface: four names, imported lazily, the very objects of their modules."""
from __future__ import annotations

import subprocess
import sys

import pytest

import orthomerge


def test_public_names_are_the_module_level_objects():
    from orthomerge import collect_stats, load_adapter, merge_adapters, osrm_init
    from orthomerge import adapters, merge, osrm, stats

    assert load_adapter is adapters.load_adapter
    assert collect_stats is stats.collect_stats
    assert merge_adapters is merge.merge_adapters
    assert osrm_init is osrm.osrm_init is osrm.init_peft_model_osrm   # a short name, not a copy
    assert set(orthomerge.__all__) == {"load_adapter", "collect_stats", "merge_adapters", "osrm_init"}
    assert set(orthomerge.__all__) <= set(dir(orthomerge))


def test_import_is_cheap_and_unknown_names_fail():
    code = ("import sys, orthomerge; assert 'torch' not in sys.modules, 'torch imported'; "
            "orthomerge.load_adapter; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        orthomerge.nope
