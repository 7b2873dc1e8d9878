"""``W₀ + ΔW`` in a model: in place for a while (scoring, searching), or as a new state dict (dense output)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def patched(model, deltas: dict[str, torch.Tensor]):
    """Add ``deltas[module]`` to each module's weight for the duration; the weights are restored after,
    so a model shared by the evaluator and the merge methods never keeps another caller's update."""
    saved = {}
    with torch.no_grad():
        try:
            for name, delta in deltas.items():
                weight = model.get_submodule(name).weight
                saved[name] = weight.detach().clone()
                weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
            yield model
        finally:
            for name, w0 in saved.items():
                model.get_submodule(name).weight.copy_(w0)


def patched_state(state: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with ``W₀ + ΔW`` (summed in float32, stored in W₀'s dtype) for every module of ``deltas``."""
    out = dict(state)
    for name, delta in deltas.items():
        key = f"{name}.weight"
        out[key] = (state[key].to(torch.float32) + delta).to(state[key].dtype)
    return out
