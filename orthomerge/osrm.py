"""OSRM initialisation (Zhang & Zhou, ACL 2025): LoRA ``A`` from the other tasks' least-used directions.

For target task ``t`` and one module input, ``S_¬t`` is the mean over the other tasks of each task's
per-token uncentred second moment. ``A`` is the ``r`` eigenvectors of ``S_¬t − β S_t`` with the smallest
eigenvalues (``β = 0``: the paper), as rows, float64, deterministic signs; ``B = 0``. Modules sharing an
input (q/k/v) share one ``A``. The ``official`` variant reproduces the released code: the null space of the
other tasks' per-sample mean vectors. The ``selective`` variant (past the paper) takes the top-r generalised
eigenvectors of ``(S_t, S_¬t + εI)``: the directions with the most own-task input energy per unit of the
other tasks'. See ``docs/osrm.md``.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import nn

from .adapters import LoraAdapter, lora_layers, set_lora_A
from .config import OSRM_VARIANTS
from .errors import OrthomergeError
from .linalg import fix_signs
from .stats import ActivationStats, check_matches_model, check_same_source

VARIANTS = OSRM_VARIANTS
# ε of the selective variant, relative to the mean eigenvalue tr(S_¬t)/n: a direction the other tasks leave
# silent counts as at most 1/SELECTIVE_EPSILON = 100× quieter than an average one (docs/osrm.md)
SELECTIVE_EPSILON = 1e-2


SOLVERS = ("auto", "shift-invert", "subset", "full")
# "auto" uses shift-invert Lanczos from this input width on: slower than LAPACK's subset solve at d = 384,
# 1024 and 2048, about 2× faster at d = 4096 (bench/bench_osrm.py, BENCHMARKS.md "OSRM solve: candidate solvers")
SHIFT_INVERT_MIN_WIDTH = 4096


def smallest_eigenvectors(matrix: np.ndarray, rank: int, solver: str = "auto",
                          device=None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors as rows for the ``rank`` smallest eigenvalues, float64.

    ``solver``: ``subset`` asks LAPACK for those eigenpairs only (``scipy.linalg.eigh(subset_by_index=…)``);
    ``full`` does a full ``eigh`` and slices (tests, benchmarks); ``shift-invert`` runs Lanczos on
    ``(M + δI)⁻¹`` through one Cholesky factor (:func:`shift_invert_smallest`) and falls back to ``subset``
    when it cannot certify its answer; ``auto`` = ``shift-invert`` from :data:`SHIFT_INVERT_MIN_WIDTH` on,
    else ``subset``. All give the same subspace wherever the eigen-gap at ``rank`` defines one. ``device``:
    a CUDA device solves with ``torch.linalg.eigh`` there (float64; worth it for large widths).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    n = matrix.shape[0]
    if not 0 < rank <= n:
        raise OrthomergeError(f"rank {rank} must be between 1 and the module's input width {n}")
    if solver not in SOLVERS:
        raise OrthomergeError(f"unknown eigensolver {solver!r} (choose from {', '.join(SOLVERS)})")
    matrix = (matrix + matrix.T) / 2
    if device is not None and torch.device(device).type == "cuda":
        values, vectors = torch.linalg.eigh(torch.from_numpy(matrix).to(device))
        return values[:rank].cpu().numpy(), fix_signs(vectors[:, :rank].T.cpu().numpy().copy())
    if solver == "auto":
        solver = "shift-invert" if n >= SHIFT_INVERT_MIN_WIDTH else "subset"
    found = shift_invert_smallest(matrix, rank) if solver == "shift-invert" else None
    if found is not None:
        values, vectors = found
    elif solver == "full":
        values, vectors = np.linalg.eigh(matrix)
        values, vectors = values[:rank], vectors[:, :rank]
    else:
        values, vectors = scipy.linalg.eigh(matrix, subset_by_index=[0, rank - 1], driver="evr")
    return values, fix_signs(np.ascontiguousarray(vectors.T))


def shift_invert_smallest(matrix: np.ndarray, rank: int, angle_tol: float = 1e-8):
    """The ``rank`` smallest eigenpairs (values ascending, vectors as columns) of a symmetric positive
    semi-definite ``matrix`` by ARPACK Lanczos on ``(M + δI)⁻¹``, δ = 1e-6·tr(M)/n, through one Cholesky
    factor; or None where the answer is not certified, for the caller to use LAPACK instead:

    * M + δI not positive definite (an indefinite matrix, e.g. ``S_¬t − β S_t``);
    * M numerically singular (smallest eigenvalue ≤ 1e-9·tr(M)/n): Lanczos may miss copies of a repeated
      eigenvalue, and a degenerate null space has no unique answer anyway;
    * the residuals do not bound the subspace's largest principal angle to the true one by ``angle_tol``
      (Davis–Kahan: max residual / (λ_{r+1} − λ_r)), e.g. a repeated or clustered λ_r.
    """
    import scipy.sparse.linalg

    n = matrix.shape[0]
    scale = float(np.trace(matrix)) / n
    if not scale > 0 or rank + 1 >= n:
        return None
    shift = 1e-6 * scale
    factor, info = torch.linalg.cholesky_ex(torch.from_numpy(matrix) + shift * torch.eye(n, dtype=torch.float64))
    if info.item():
        return None
    factor = factor.numpy()
    op = scipy.sparse.linalg.LinearOperator(
        (n, n), dtype=np.float64,
        matvec=lambda v: scipy.linalg.cho_solve((factor, True), v, check_finite=False))
    try:
        inverse, vectors = scipy.sparse.linalg.eigsh(op, k=rank + 1, which="LA", tol=1e-12, v0=np.ones(n))
    except scipy.sparse.linalg.ArpackError:
        return None
    order = np.argsort(-inverse)                      # largest of the inverse = smallest of M
    values, vectors = 1 / inverse[order] - shift, vectors[:, order]
    if values[0] <= 1e-9 * scale:
        return None
    residual = np.linalg.norm(matrix @ vectors[:, :rank] - vectors[:, :rank] * values[:rank], axis=0).max()
    gap = values[rank] - values[rank - 1]
    if not gap > 0 or residual / gap > angle_tol:
        return None
    return values[:rank], vectors[:, :rank]


def paper_basis(other: np.ndarray, rank: int, own: np.ndarray | None = None, beta: float = 0.0,
                device=None) -> np.ndarray:
    """``argmin tr(A (S_¬t − β S_t) Aᵀ)`` s.t. ``A Aᵀ = I``: rows = smallest eigenvectors."""
    matrix = np.asarray(other, dtype=np.float64)
    if beta:
        if own is None:
            raise OrthomergeError("beta > 0 needs the task's own statistics")
        matrix = matrix - beta * np.asarray(own, dtype=np.float64)
    return smallest_eigenvectors(matrix, rank, device=device)[1]


def selective_basis(own: np.ndarray, other: np.ndarray, rank: int, epsilon: float = SELECTIVE_EPSILON,
                    device=None) -> np.ndarray:
    """The ``rank`` directions maximising the generalised Rayleigh quotient ``aᵀ S_t a / aᵀ (S_¬t + εI) a``,
    ε = ``epsilon`` · tr(S_¬t)/n: the top generalised eigenvectors of ``(S_t, S_¬t + εI)``, as unit rows in
    descending quotient order, float64, deterministic signs. The rows are (S_¬t + εI)-orthogonal, not
    orthonormal. ``device``: a CUDA device solves there (Cholesky reduction + ``torch.linalg.eigh``)."""
    own = np.asarray(own, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    n = other.shape[0]
    if not 0 < rank <= n:
        raise OrthomergeError(f"rank {rank} must be between 1 and the module's input width {n}")
    ridge = epsilon * np.trace(other) / n
    if not ridge > 0:
        raise OrthomergeError("the selective variant needs other-task statistics with non-zero energy and ε > 0")
    own, other = (own + own.T) / 2, (other + other.T) / 2 + ridge * np.eye(n)
    if device is not None and torch.device(device).type == "cuda":
        vectors = _generalised_top_torch(torch.from_numpy(own).to(device), torch.from_numpy(other).to(device), rank)
    else:
        _, vectors = scipy.linalg.eigh(own, other, subset_by_index=[n - rank, n - 1])
        vectors = vectors[:, ::-1]
    rows = vectors.T / np.linalg.norm(vectors, axis=0)[:, None]
    return fix_signs(np.ascontiguousarray(rows))


def _generalised_top_torch(a: torch.Tensor, b: torch.Tensor, rank: int) -> np.ndarray:
    """Top ``rank`` generalised eigenvectors of (a, b), b positive definite, as columns (descending):
    with b = L Lᵀ, the eigenvectors y of L⁻¹ a L⁻ᵀ give x = L⁻ᵀ y."""
    L = torch.linalg.cholesky(b)
    c = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, a, upper=False).T, upper=False)
    _, y = torch.linalg.eigh((c + c.T) / 2)
    x = torch.linalg.solve_triangular(L.T, y[:, -rank:].flip(1), upper=True)
    return x.cpu().numpy()


def official_basis(other_means: np.ndarray, rank: int) -> np.ndarray:
    """The released code's init: the last ``rank`` right singular vectors of the stacked mean vectors."""
    other_means = np.atleast_2d(np.asarray(other_means, dtype=np.float64))
    n = other_means.shape[1]
    if not 0 < rank <= n:
        raise OrthomergeError(f"rank {rank} must be between 1 and the module's input width {n}")
    _, _, vt = np.linalg.svd(other_means, full_matrices=True)
    return fix_signs(vt[n - rank:][::-1].copy())


def other_second_moment(others: list[ActivationStats], module: str) -> np.ndarray:
    """``S_¬t``: equal-weight mean over the other tasks of their per-token second moments."""
    return (sum(s.second_moment(module) for s in others) / len(others)).numpy()


def _check_inputs(others: list[ActivationStats], own: ActivationStats | None, model: nn.Module | None,
                  modules: list[str]) -> None:
    if not others:
        raise OrthomergeError("OSRM needs statistics of at least one other task")
    for stats in others[1:] + ([own] if own is not None else []):
        check_same_source(others[0], stats)
    for stats in others + ([own] if own is not None else []):
        if model is not None:
            check_matches_model(stats, model, modules)


def osrm_bases(modules: list[str], others: list[ActivationStats], rank: int, variant: str = "paper",
               own: ActivationStats | None = None, beta: float = 0.0, model: nn.Module | None = None,
               ) -> dict[str, np.ndarray]:
    """OSRM ``A`` (float64 [rank, n]) per module; solved once per distinct input and shared. The
    eigenproblems run on ``model``'s device when it is a CUDA device (else with LAPACK on the CPU).
    ``selective`` needs ``own`` (β is not used by it, nor by ``official``)."""
    device = next(model.parameters()).device if model is not None else None
    if variant not in VARIANTS:
        raise OrthomergeError(f"unknown OSRM variant {variant!r} (choose from {', '.join(VARIANTS)})")
    if beta < 0:
        raise OrthomergeError(f"beta must be ≥ 0, got {beta}")
    if variant == "selective" and own is None:
        raise OrthomergeError("the selective variant needs the task's own statistics")
    _check_inputs(others, own, model, modules)
    solved: dict[str, np.ndarray] = {}
    bases = {}
    for module in modules:
        key = others[0].key_of(module)
        if key not in solved:
            if variant == "paper":
                own_moment = own.second_moment(module).numpy() if own is not None else None
                solved[key] = paper_basis(other_second_moment(others, module), rank, own_moment, beta, device)
            elif variant == "selective":
                solved[key] = selective_basis(own.second_moment(module).numpy(), other_second_moment(others, module),
                                              rank, device=device)
            else:
                means = np.stack([s.sample_mean(module).numpy() for s in others])
                solved[key] = official_basis(means, rank)
        bases[module] = solved[key]
    return bases


def init_metadata(others: list[ActivationStats], rank: int, variant: str, own: ActivationStats | None,
                  beta: float) -> dict:
    return {
        "init": "osrm",
        "variant": variant,
        "beta": beta,
        "rank": rank,
        "other_stats": [str(s.path) if s.path else s.meta.get("model") for s in others],
        "own_stats": str(own.path) if own is not None and own.path else None,
        "samples_per_task": [s.sample_count for s in others],
        "fingerprint": others[0].meta.get("fingerprint"),
        **({"epsilon": SELECTIVE_EPSILON} if variant == "selective" else {}),
    }


def init_peft_model_osrm(peft_model, others: list[ActivationStats], own: ActivationStats | None = None,
                         beta: float = 0.0, variant: str = "paper") -> dict:
    """Initialise a freshly wrapped ``PeftModel`` in place: ``A`` from OSRM, ``B = 0``.

    The in-memory path, like PEFT's EVA/CorDA: ``get_peft_model(model, LoraConfig(...))``, then this,
    then hand the model to a Trainer. Returns the init metadata (also stored by :func:`snapshot` users).
    """
    layers = lora_layers(peft_model)
    if not layers:
        raise OrthomergeError("the model has no LoRA layers to initialise")
    name = peft_model.active_adapter
    ranks = {m: layer.lora_A[name].weight.shape[0] for m, layer in layers.items()}
    if len(set(ranks.values())) != 1:
        raise OrthomergeError("OSRM init needs one rank for all modules")
    rank = next(iter(ranks.values()))
    bases = osrm_bases(list(layers), others, rank, variant, own, beta, model=peft_model.get_base_model())
    set_lora_A(peft_model, bases)
    return init_metadata(others, rank, variant, own, beta)


osrm_init = init_peft_model_osrm   # its short public name: ``orthomerge.osrm_init``


def post_convert(adapter: LoraAdapter, others: list[ActivationStats], variant: str = "paper",
                 own: ActivationStats | None = None, beta: float = 0.0) -> tuple[LoraAdapter, dict]:
    """Project a trained LoRA onto the OSRM subspace (the paper's "post" mode), keeping rank and scaling.

    ``B' = B (A A'ᵀ)(A' A'ᵀ)⁻¹``, the least-squares ``B'`` for the new ``A'``, so that ``s B' A' = ΔW P`` with
    ``P`` the orthogonal projector onto the row space of ``A'`` (``A' A'ᵀ = I`` except for ``selective``).
    Reports ``ρ = ‖ΔW P‖_F / ‖ΔW‖_F`` per module and overall (ρ² = energy kept).
    """
    ranks = {adapter.rank(m) for m in adapter.modules}
    if len(ranks) != 1:
        raise OrthomergeError(f"{adapter.name}: post conversion needs one rank for all modules")
    bases = osrm_bases(adapter.modules, others, ranks.pop(), variant, own, beta)
    A, B, kept = {}, {}, {}
    total_in = total_kept = 0.0
    for module in adapter.modules:
        a_new = torch.from_numpy(bases[module])
        a_old = adapter.A[module].to(torch.float64)
        b_old = adapter.B[module].to(torch.float64)
        b_new = torch.linalg.solve(a_new @ a_new.T, (b_old @ (a_old @ a_new.T)).T).T
        delta_norm = torch.linalg.matrix_norm(adapter.scaling[module] * b_old @ a_old).item()
        kept_norm = torch.linalg.matrix_norm(adapter.scaling[module] * b_new @ a_new).item()
        kept[module] = kept_norm / delta_norm if delta_norm > 0 else 1.0
        total_in += delta_norm ** 2
        total_kept += kept_norm ** 2
        A[module] = a_new.to(adapter.A[module].dtype)
        B[module] = b_new.to(adapter.B[module].dtype)
    report = {"retained_fraction": (total_kept / total_in) ** 0.5 if total_in else 1.0,
              "retained_energy": total_kept / total_in if total_in else 1.0,
              "per_module": kept}
    metadata = dict(adapter.metadata, post=init_metadata(others, adapter.rank(adapter.modules[0]), variant,
                                                          own, beta), post_report=report)
    new = LoraAdapter(A=A, B=B, scaling=dict(adapter.scaling), heads=dict(adapter.heads),
                      config=dict(adapter.config), metadata=metadata)
    return new, report


def post_converted(adapters: list[LoraAdapter], stats: list[ActivationStats], variant: str = "paper",
                   beta: float = 0.0) -> list[LoraAdapter]:
    """The paper's ``post`` arm at merge time: every trained adapter ``adapters[i]`` (task i) converted by
    :func:`post_convert` with the other tasks' statistics (``stats[j]``, j ≠ i) and its own (``stats[i]``,
    for β or the selective variant). Each result's retained energy is in ``metadata["post_report"]``."""
    if len(adapters) != len(stats):
        raise OrthomergeError(f"post conversion needs one statistics per adapter, got {len(adapters)} adapters "
                              f"and {len(stats)} statistics")
    if len(adapters) < 2:
        raise OrthomergeError("post conversion needs at least two tasks (the others' statistics)")
    return [post_convert(adapter, stats[:i] + stats[i + 1:], variant, stats[i], beta)[0]
            for i, adapter in enumerate(adapters)]
