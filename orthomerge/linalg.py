"""Small linear-algebra conventions shared by OSRM and the merge suite."""
from __future__ import annotations

import math

import numpy as np
import torch


def fix_signs(rows):
    """Deterministic signs: the largest-|·| entry of every row is made positive (first index on a tie).

    ``rows``: a numpy array or a torch tensor [k, n]; returns the same kind. Singular and eigen-vectors
    are defined up to sign, and element-wise rules applied in such a basis depend on it.
    """
    if isinstance(rows, np.ndarray):
        return fix_signs(torch.from_numpy(rows)).numpy()
    return rows * row_signs(rows)[:, None]


def row_signs(rows: torch.Tensor) -> torch.Tensor:
    """±1 per row: the sign of its largest-|·| entry (+1 for an all-zero row)."""
    pivot = rows.abs().argmax(dim=1)
    signs = torch.sign(rows[torch.arange(rows.shape[0], device=rows.device), pivot])
    signs[signs == 0] = 1
    return signs


def svd_flip(u: torch.Tensor, vh: torch.Tensor | None = None):
    """:func:`fix_signs` on the columns of ``u`` (the rows of ``vh`` flipped with them)."""
    signs = row_signs(u.T)
    u = u * signs
    return (u, vh * signs[:, None]) if vh is not None else u


FINITE_CHUNK = 1 << 20   # entries per reduction of all_finite: its float64 temporary stays at 8 MB


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf (integers always do). Below float64 it is a float64 sum per chunk of
    :data:`FINITE_CHUNK` entries: NaN and Inf propagate through it and finite float32 values cannot overflow
    it, so the answer is exact; a reduction is 3–8× faster than ``isfinite(t).all()`` on LoRA-sized factors,
    and chunking bounds the float64 copy the sum makes (a whole 4096² update would need 128 MB)."""
    if not t.is_floating_point():
        return True
    if t.dtype == torch.float64:
        def finite(chunk):
            return bool(torch.isfinite(chunk).all())
    else:
        def finite(chunk):
            return math.isfinite(chunk.sum(dtype=torch.float64).item())
    return all(finite(chunk) for chunk in t.reshape(-1).split(FINITE_CHUNK))
