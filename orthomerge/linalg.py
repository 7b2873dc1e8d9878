"""Small linear-algebra conventions shared by OSRM and the merge suite."""
from __future__ import annotations

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
