"""Run a registered merge method over PEFT adapters, module by module; the engine names no method.

Per module (under tqdm; a batched rule gets every module of one shape in one call): the factors are upcast
to float32 with the LoRA scale folded into B, the rule runs, and its update is kept exactly (low-rank
rules), re-compressed to ``rank`` (exact QR + small SVD for factors; dense results to ``rank`` or Σr by
SVD, error reported), or kept dense for a full-model output (``dense=True``). A method's model-level steps
are its own ``prepare`` / ``finalize`` hooks (see :mod:`orthomerge.merge.registry`). Heads (``modules_to_save``) are never merged: the result carries each
task's head (:mod:`orthomerge.merge.result`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..adapters import LoraAdapter, validate_adapter
from ..errors import OrthomergeError
from ..linalg import all_finite
from ..models import LABELLED_TASK_TYPES
from .inputs import (check_weights, load_adapters, load_data, load_stats, module_grams,
                     resolve_model, task_names, validate_compatible, where)
from .recompress import recompress_dense, recompress_factors
from .registry import (DEFAULT_METHOD, METHODS, Dense, Finalized, LowRank, MergeContext, MethodSpec, ModuleUpdates,
                       PerTask, Prepared, get_method, module_seed)
from .result import HEAD_POLICY, MergeResult

log = logging.getLogger("orthomerge")
SVD_CHOICES = ("auto", "exact", "randomized")


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run with ``threads`` intra-op threads (None: ``$ORTHOMERGE_THREADS``, default 1; 0: torch's default).

    Why 1 by default: the merge is dominated by many small decompositions (thin QR, R×R SVDs) and
    row-block element-wise passes. On a 2-core VM with another busy process, torch's OpenMP threads made a
    384×384 SVD take 4.8 s instead of 0.03 s single-threaded (1024×1024: 5.2 s vs 0.43 s) [measured].
    """
    if threads is None:
        threads = int(os.environ.get("ORTHOMERGE_THREADS", "1"))
    old = torch.get_num_threads()
    if threads <= 0 or threads == old:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def merge_adapters(adapters, method: str = DEFAULT_METHOD, weights=None, *, space: str | None = None,
                   rank: int | None = None, dense: bool = False, model=None, stats=None, seed: int = 0,
                   svd: str = "auto", progress: bool = False, threads: int | None = None, data=None,
                   tokenizer=None, device=None, **params) -> MergeResult:
    """Merge LoRA adapters (folders or :class:`LoraAdapter`) with a registered method.

    ``weights`` (default 1 each) are per task, ``params`` the method's hyper-parameters (``scale`` λ,
    ``density``, …; see ``list_methods()``), ``space`` picks the ``core``/``knots``/``dense``/``factored``
    variant of a base rule by name. ``rank``: re-compress every module to this rank (exact for low-rank
    results; dense results default to Σr). ``dense``: keep dense ΔW for a full merged model (needs the base
    ``model``: a spec string or module; default the adapters' base_model_name_or_path). ``stats``: one
    statistics file (or object with ``gram``/``tokens``/``modules``) per adapter, for statistics-driven
    methods. ``threads``: torch threads during the merge (see :func:`torch_threads`).
    ``data``: for data-driven methods (``needs_data``), one item per adapter — a
    :class:`~orthomerge.tasks.Task`, a :class:`~orthomerge.tasks.Split`, a bundled task name or a tasks
    YAML (``file.yaml`` with one task, or ``file.yaml#name``); each method says which split it uses.
    ``tokenizer``: for data-driven methods when ``model`` is a module without a local folder name.
    ``device``: where the rules and re-compression run (default the CPU; e.g. ``"cuda"`` for large
    modules); results come back to the CPU. Data-driven methods run the model where it is.
    """
    model_threads = torch.get_num_threads()   # the caller's: model passes run with it, not with the merge's
    with torch_threads(threads):
        return _merge(adapters, method, weights, space=space, rank=rank, dense=dense, model=model, stats=stats,
                      seed=seed, svd=svd, progress=progress, params=params, data=data, tokenizer=tokenizer,
                      device=torch.device(device or "cpu"), model_threads=model_threads)


def _nonempty(b: torch.Tensor, a: torch.Tensor):
    """PEFT needs r ≥ 1: an all-zero update is written as one zero rank."""
    if a.shape[0] == 0:
        return torch.zeros(b.shape[0], 1), torch.zeros(1, a.shape[1])
    return b.contiguous(), a.contiguous()


def _merge(adapters, method, weights, *, space, rank, dense, model, stats, seed, svd, progress,
           params, data=None, tokenizer=None, device=torch.device("cpu"), model_threads: int = 0) -> MergeResult:
    t0 = time.perf_counter()
    spec = get_method(method, space)
    adapters = load_adapters(adapters)
    count = len(adapters)
    weights = check_weights(weights, count)
    if rank is not None and int(rank) < 1:
        raise OrthomergeError(f"rank {rank}: must be at least 1")
    if svd not in SVD_CHOICES:
        raise OrthomergeError(f"svd={svd!r}: choose {', '.join(SVD_CHOICES)}")
    resolved = spec.resolve(params)
    validate_compatible(adapters)
    modules = sorted(adapters[0].modules)
    notes: list[str] = []
    biased = [a for a in adapters if a.has_biases]
    if biased and not spec.linear:
        linear = ", ".join(sorted(n for n, m in METHODS.items() if m.linear and m.space == "factored"))
        raise OrthomergeError(f"{where(biased[0])}: has biases (lora_bias or bias={biased[0].config.get('bias')!r}), "
                              f"which merge exactly only with linear methods ({linear}); {spec.name} is "
                              "not linear in the updates")
    needs_weights = ("dense output" if dense else f"{spec.name}" if spec.needs_data else
                     "merging trained biases (bias='lora_only'|'all')" if any(a.biases for a in adapters) else None)
    model = resolve_model(model, adapters, notes, weights=needs_weights is not None, tokenizer=spec.needs_data,
                          why=needs_weights, device=device if spec.needs_data else None)
    for note in notes:
        log.warning(note)
    if model is not None:
        for a in adapters:
            validate_adapter(a, model, where=where(a), heads=False)
    loaded_stats = load_stats(stats, adapters, modules, spec.name) if spec.needs_stats else None
    names = task_names(adapters)
    if spec.needs_data:
        if data is None:
            raise OrthomergeError(f"{spec.name} needs task data: one task or split per adapter "
                                  "(data=[...], or 'data:' per adapter in a recipe)")
        if model is None:
            raise OrthomergeError(f"{spec.name} needs the base model to run the data through")
    t_load = time.perf_counter() - t0
    rule_threads = torch.get_num_threads()

    def merge_dense(other: str, other_params: dict) -> dict[str, torch.Tensor]:
        """Another method's dense ΔW of these adapters (for methods that compare merges)."""
        sub = get_method(other)
        with torch_threads(rule_threads):   # its rules run like the merge's own, even inside a model pass
            result = _merge(adapters, other, weights, space=None, rank=None, dense=True, model=model,
                            stats=ctx.stats if sub.needs_stats else None, seed=seed, svd=svd, progress=False,
                            params=other_params, data=ctx.data if sub.needs_data else None, tokenizer=tokenizer,
                            device=device, model_threads=model_threads)
        return {m: result.delta(m) for m in modules}

    ctx = MergeContext(adapters=adapters, names=names, modules=modules, weights=weights, params=resolved,
                       model=model, data=load_data(data, adapters) if spec.needs_data else None,
                       tokenizer=tokenizer, stats=[st for _, st in loaded_stats] if loaded_stats else stats,
                       seed=seed, progress=progress, merge_dense=merge_dense)
    s = time.perf_counter()
    # a data-driven method's model passes (Fisher's backward passes, AdaMerging's steps, search's scoring) are
    # large GEMMs: they get the caller's thread count back; the per-module rules stay on ``threads``
    with torch_threads(model_threads) if spec.needs_data else contextlib.nullcontext():
        prepared = spec.prepare(ctx) if spec.prepare is not None else Prepared()
    t_prep = time.perf_counter() - s

    outputs = names if spec.per_task else [""]                  # "" = the one merged update
    run = _run_modules(spec, ctx, prepared, loaded_stats, outputs, dense=dense, rank=rank, svd=svd, device=device)
    factors, dense_out, losses = run.factors, run.dense, run.losses
    finalized = spec.finalize(ctx, run.info) if spec.finalize is not None else Finalized()
    for m, scales in finalized.scales.items():   # per output, a multiplier of the (linear) update
        for out_name, c in zip(outputs, scales):
            if dense:
                dense_out[out_name][m] = dense_out[out_name][m] * c
            else:
                factors[out_name][0][m] = factors[out_name][0][m] * c

    lora_bias, biases = _merge_biases(spec, resolved, adapters, weights, ctx.keys, model) if biased else ({}, {})
    _check_finite(factors, dense_out, {**lora_bias, **biases}, losses)
    merged, tasks = (None, {}) if dense else _adapters(spec, resolved, adapters, names, weights, seed, factors,
                                                        dict(lora_bias=lora_bias, biases=biases))
    err_sq = sum(l.err_sq for l in losses.values())
    tot_sq = sum(l.total_sq for l in losses.values())
    report = {
        "method": spec.name, "base_rule": spec.base, "space": spec.space, "family": spec.family,
        "params": resolved, "weights": weights, "seed": seed if spec.random else None,
        "adapters": [{"name": n, "path": str(a.path) if a.path else None,
                      "ranks": sorted({a.rank(m) for m in modules})} for n, a in zip(names, adapters)],
        "output": {"format": "dense" if dense else "peft", "rank": rank, "svd": svd,
                   "layout": "per-task updates in tasks/<name>" if spec.per_task else "merged LoRA in OUT/, "
                             "merged LoRA + own head in tasks/<name>"},
        "heads": HEAD_POLICY,
        "modules": {k: l.as_dict() for k, l in losses.items()},
        "total": {"rel_error": (err_sq / tot_sq) ** 0.5 if tot_sq > 0 else 0.0,
                  "max_module_rel_error": max((l.rel_error for l in losses.values()), default=0.0),
                  "err_sq": err_sq, "total_sq": tot_sq},
        "timing": {"load_s": t_load, "rule_s": run.rule_s, "recompress_s": run.recompress_s,
                   "merge_s": time.perf_counter() - t0},
        "notes": notes,
    }
    if spec.prepare is not None:
        report["timing"]["prepare_s"] = t_prep
    report.update(prepared.report)
    report.update(finalized.report)
    bias_delta = {f"{m}.bias": v for m, v in lora_bias.items()}
    state = model.state_dict() if biases else {}
    bias_delta.update({k: v - state[k].to(torch.float32) for k, v in biases.items()})
    return MergeResult(method=spec.name, params=resolved, names=names, adapters=adapters, merged=merged,
                       tasks=tasks, dense=dense_out, report=report, model=model, bias_delta=bias_delta,
                       files=dict(prepared.files))


@dataclass
class ModuleRun:
    """The per-module loop's outputs: per output name, (B, A) per module or dense ΔW per module; the
    re-compression losses; each module's ``PerTask.info`` for ``finalize``; timings."""

    factors: dict
    dense: dict | None
    losses: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    rule_s: float = 0.0
    recompress_s: float = 0.0


def _run_modules(spec: MethodSpec, ctx: MergeContext, prepared: Prepared, loaded_stats, outputs: list[str], *,
                 dense: bool, rank: int | None, svd: str, device: torch.device) -> ModuleRun:
    """The rule on every module on ``device`` — one module at a time, or for a batched rule every group of
    modules of one shape at once — each update kept exact, re-compressed, or dense, and stored on the CPU."""
    run = ModuleRun(factors={o: ({}, {}) for o in outputs}, dense={o: {} for o in outputs} if dense else None)
    bar = tqdm(total=len(ctx.modules), desc=f"merge {spec.name}", unit="module", disable=not ctx.progress)
    for group in _module_groups(ctx) if spec.batch_fn is not None else [[m] for m in ctx.modules]:
        factors = [[tuple(t.to(device) for t in a.scaled_factors(m)) for a in ctx.adapters] for m in group]
        s = time.perf_counter()
        if spec.batch_fn is not None:
            stacked = [(torch.stack([f[i][0] for f in factors]), torch.stack([f[i][1] for f in factors]))
                       for i in range(len(ctx.adapters))]
            results = spec.batch_fn(ModuleUpdates(name=group[0], factors=stacked, weights=ctx.weights),
                                    **ctx.params)
        else:
            m = group[0]
            updates = ModuleUpdates(name=m, factors=factors[0], weights=ctx.weights,
                                    seeds=[module_seed(ctx.seed, key, m) for key in ctx.keys],
                                    extras=prepared.extras.get(m))
            if loaded_stats is not None:
                grams, updates.tokens = module_grams(loaded_stats, m, updates.shape[1])
                updates.grams = [g.to(device) for g in grams]
            results = [spec.fn(updates, **ctx.params)]
        run.rule_s += time.perf_counter() - s
        s = time.perf_counter()
        for m, f, result in zip(group, factors, results):
            _keep(run, m, result, outputs, sum(a.shape[0] for _, a in f), dense=dense, rank=rank, svd=svd)
        run.recompress_s += time.perf_counter() - s
        bar.update(len(group))
    bar.close()
    return run


def _module_groups(ctx: MergeContext) -> list[list[str]]:
    """The modules in groups of one factor shape in every adapter (what a batched rule merges at once)."""
    groups: dict[tuple, list[str]] = {}
    for m in ctx.modules:
        key = tuple((tuple(a.B[m].shape), tuple(a.A[m].shape)) for a in ctx.adapters)
        groups.setdefault(key, []).append(m)
    return list(groups.values())


def _keep(run: ModuleRun, m: str, result, outputs: list[str], sum_r: int, *, dense: bool, rank: int | None,
          svd: str) -> None:
    """Store one module's rule result: dense ΔW, or factors kept exact / re-compressed (loss recorded)."""
    if isinstance(result, PerTask):
        run.info[m] = result.info
        results = result.updates
    else:
        results = [result]
    for out_name, upd in zip(outputs, results):
        key = m if out_name == "" else f"{out_name}:{m}"
        if dense:
            run.dense[out_name][m] = (upd.delta if isinstance(upd, Dense) else upd.B @ upd.A).cpu()
            continue
        if isinstance(upd, LowRank):
            b, a_, loss = recompress_factors(upd.B, upd.A, rank)
        else:
            b, a_, loss = recompress_dense(upd.delta, rank or sum_r, svd)
        run.factors[out_name][0][m], run.factors[out_name][1][m] = _nonempty(b.cpu(), a_.cpu())
        run.losses[key] = loss


def _adapters(spec: MethodSpec, resolved: dict, adapters: list[LoraAdapter], names: list[str], weights, seed,
              factors: dict, carried: dict) -> tuple[LoraAdapter | None, dict[str, LoraAdapter]]:
    """The merged LoRA (no head) and, per task, the LoRA with that task's head."""
    meta = {"merge": {"method": spec.name, "params": resolved, "weights": weights, "seed": seed,
                      "adapters": [str(a.path) if a.path else a.name for a in adapters]}}
    merged = None
    if not spec.per_task:
        merged = LoraAdapter.from_factors(*factors[""], heads={}, base=adapters[0], metadata=meta, **carried)
        if adapters[0].task_type in LABELLED_TASK_TYPES:
            # No head here: without task_type PEFT does not expect modules_to_save (SEQ_CLS would add one).
            merged.config.update(task_type=None, modules_to_save=None)
    tasks = {}
    for name, a in zip(names, adapters):
        B, A = factors[name] if spec.per_task else factors[""]
        tasks[name] = LoraAdapter.from_factors(B, A, heads=a.heads, base=a,
                                               metadata={**meta, "task": name, "head": "own"}, **carried)
    if carried["biases"]:
        bias = "all" if any(a.config.get("bias") == "all" for a in adapters) else "lora_only"
        for adapter in [merged, *tasks.values()]:
            if adapter is not None:
                adapter.config["bias"] = bias
    return merged, tasks


def _merge_biases(spec: MethodSpec, call: dict, adapters: list[LoraAdapter], weights: list[float],
                  keys: list[str], model) -> tuple[dict, dict]:
    """A linear method applied to the biases as one-column updates: ``lora_B`` biases (``s·b``, PEFT
    ``lora_bias``) and the change of trained biases (``bias='lora_only'|'all'``) against the base.
    A bias an adapter lacks is a zero update. Returns (merged lora_B biases, merged absolute biases)."""
    def merged(name: str, vectors: list[torch.Tensor]) -> torch.Tensor:
        columns = ModuleUpdates(name=name, factors=[(v.to(torch.float32)[:, None], torch.ones(1, 1)) for v in vectors],
                                weights=weights, seeds=[module_seed(0, k, name) for k in keys])
        out = spec.fn(columns, **call)
        return (out.delta if isinstance(out, Dense) else out.B @ out.A)[:, 0]

    lora_bias = {}
    for m in sorted({m for a in adapters for m in a.lora_bias}):
        lora_bias[m] = merged(f"{m}.lora_B.bias", [
            a.lora_bias[m].to(torch.float32) * a.scaling[m] if m in a.lora_bias else torch.zeros(a.B[m].shape[0])
            for a in adapters])
    biases = {}
    state = model.state_dict() if any(a.biases for a in adapters) else {}
    for k in sorted({k for a in adapters for k in a.biases}):
        base = state[k].to(torch.float32)
        biases[k] = base + merged(k, [a.biases[k].to(torch.float32) - base if k in a.biases
                                      else torch.zeros_like(base) for a in adapters])
    return lora_bias, biases


def _check_finite(factors: dict, dense_out: dict | None, biases: dict, losses: dict) -> None:
    """A merged update with NaN or Inf (e.g. from huge weights) is an error, never an output."""
    for out_name, (B, A) in factors.items():
        for m in B:
            if not (all_finite(B[m]) and all_finite(A[m])):
                raise OrthomergeError(f"{m}: the merged update is not finite (NaN or Inf{' for ' + out_name if out_name else ''}); "
                                      "check the weights and scale")
    for deltas in (dense_out or {}).values():
        for m, d in deltas.items():
            if not all_finite(d):
                raise OrthomergeError(f"{m}: the merged update is not finite (NaN or Inf); check the weights and scale")
    for name, b in biases.items():
        if not all_finite(b):
            raise OrthomergeError(f"{name}: the merged bias is not finite (NaN or Inf); check the weights and scale")
    for key, loss in losses.items():
        if not (math.isfinite(loss.err_sq) and math.isfinite(loss.total_sq)):
            raise OrthomergeError(f"{key}: the merged update's norm overflows (not finite); check the weights and scale")
