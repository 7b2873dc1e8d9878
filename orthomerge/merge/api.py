"""Run a registered merge rule over PEFT adapters: validation, module iteration, heads, output, report.

``merge_adapters(adapters, method=..., weights=..., **params) -> MergeResult`` and ``run_recipe(yaml)``.
Per module (one at a time, under tqdm): the factors are upcast to float32 with the LoRA scale folded
into B, the rule runs, and its update is kept exactly (low-rank rules), re-compressed to ``rank``
(exact QR + small SVD for factors; dense results to ``rank`` or Σr by SVD, error reported), or kept
dense for a full-model output (``dense=True``).

Heads (``modules_to_save``, e.g. the classifier) are never merged: the result carries each task's head.
Output layout (:meth:`MergeResult.save`)::

    OUT/                      merged LoRA, no head (PEFT folder)  |  dense: base + merged ΔW (model folder)
    OUT/tasks/<adapter name>/ merged LoRA + that task's head       |  dense: that task's full model
    OUT/merge_report.json     method, params, per-module and total re-compression error, timings

For per-task methods (``emr``) OUT/ holds no single model: each ``tasks/<name>`` has its own update.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

log = logging.getLogger("orthomerge")

from ..models import LABELLED_TASK_TYPES, model_for_heads
from ..adapters import WEIGHTS_NAME, LoraAdapter, load_adapter, save_adapter, validate_adapter
from ..errors import OrthomergeError
from ..outputs import atomic_dir, check_output
from .elementwise import abs_histogram_threshold, check_density
from .recompress import Loss, recompress_dense, recompress_factors
from .registry import (Dense, LowRank, MergeContext, MethodSpec, ModuleTask, PerTask, get_method, module_seed,
                       per_task, scaled_factors)

REPORT_NAME = "merge_report.json"
RECIPE_NAME = "recipe.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "merges.txt", "vocab.json", "tokenizer.model")
HEAD_POLICY = "task heads (modules_to_save) are not merged: OUT/tasks/<name>/ carries each task's own head"


@dataclass
class MergeResult:
    """What :func:`merge_adapters` produced; :meth:`save` writes it.

    ``merged``: the merged LoRA without heads (scaling 1; ``None`` for per-task methods and dense output).
    ``tasks``: per task name, the merged LoRA plus that task's head (``emr``: the task's own update).
    ``dense``: with ``dense=True``, per output (``""`` = merged, else a task name) the merged ΔW per module.
    """

    method: str
    params: dict
    names: list[str]
    adapters: list[LoraAdapter]
    merged: LoraAdapter | None
    tasks: dict[str, LoraAdapter]
    dense: dict[str, dict[str, torch.Tensor]] | None
    report: dict
    model: object = None
    path: Path | None = None
    bias_delta: dict[str, torch.Tensor] = field(default_factory=dict)   # model bias name -> additive change

    def input_paths(self) -> list[Path]:
        return [a.path for a in self.adapters if a.path is not None]

    def delta(self, module: str, task: str | None = None) -> torch.Tensor:
        """The merged ΔW of ``module`` (for ``task``'s output where updates differ per task)."""
        if self.dense is not None:
            return self.dense[task or ""][module]
        adapter = self.tasks[task] if task else self.merged
        if adapter is None:
            raise OrthomergeError(f"{self.method}: one update per task; name the task")
        return adapter.delta(module)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write the output folder atomically (nothing is left behind on failure). An existing non-empty
        ``out`` is replaced only with ``overwrite``, and never one that holds an input adapter."""
        start = time.perf_counter()
        out = check_output(out, overwrite=overwrite, inputs=self.input_paths())
        with atomic_dir(out) as tmp:
            if self.dense is not None:
                self._save_dense(tmp)
            else:
                if self.merged is not None:
                    save_adapter(self.merged, tmp)
                for name, adapter in self.tasks.items():
                    save_adapter(adapter, tmp / "tasks" / name)
            if self.report.get("best_recipe"):   # search: the chosen recipe, loadable by ``orthomerge merge --config``
                import yaml

                (tmp / RECIPE_NAME).write_text(yaml.safe_dump(self.report["best_recipe"], sort_keys=False))
            self.report["timing"]["save_s"] = time.perf_counter() - start
            (tmp / REPORT_NAME).write_text(json.dumps(self.report, indent=2, sort_keys=True, default=str) + "\n")
        self.path = out
        return out

    def _save_dense(self, tmp: Path) -> None:
        if self.model is None:
            raise OrthomergeError("dense output needs the base model (--model)")
        base_state = self.model.state_dict()
        src = Path(getattr(self.model.config, "_name_or_path", "") or "")
        outputs = ([("", tmp, {})] if "" in self.dense else []) + [
            (name, tmp / "tasks" / name, a.heads) for name, a in zip(self.names, self.adapters)]
        for key, folder, heads in outputs:
            deltas = self.dense[key] if key in self.dense else self.dense[""]
            state = dict(base_state)
            for module, delta in deltas.items():
                w = base_state[f"{module}.weight"]
                state[f"{module}.weight"] = (w.to(torch.float32) + delta).to(w.dtype)
            for name, delta in self.bias_delta.items():
                state[name] = (base_state[name].to(torch.float32) + delta).to(base_state[name].dtype)
            model = model_for_heads(self.model, heads, folder)
            state.update(heads)
            model.load_state_dict(state, strict=True)
            folder.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(str(folder))
            for name in TOKENIZER_FILES:
                if src.is_dir() and (src / name).exists():
                    shutil.copy(src / name, folder / name)


# ---------------------------------------------------------------- inputs and validation


def _load(adapters) -> list[LoraAdapter]:
    if not adapters:
        raise OrthomergeError("no adapters to merge")
    out = []
    for item in adapters:
        adapter = item if isinstance(item, LoraAdapter) else load_adapter(item)
        for module in adapter.modules:
            for which, t in (("lora_A", adapter.A[module]), ("lora_B", adapter.B[module])):
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise OrthomergeError(f"{_where(adapter)}: {module}.{which} contains NaN or Inf")
        out.append(adapter)
    return out


def _where(adapter: LoraAdapter) -> str:
    return str(adapter.path / WEIGHTS_NAME) if adapter.path else adapter.name


def validate_compatible(adapters: list[LoraAdapter]) -> None:
    """Same base model name, same modules, same shapes — else one line naming the file and the problem."""
    first = adapters[0]
    base0 = first.config.get("base_model_name_or_path")
    for other in adapters[1:]:
        if other.task_type != first.task_type:
            raise OrthomergeError(f"{other.path or other.name}: task type {other.task_type!r} differs from "
                                  f"{first.task_type!r} of {first.path or first.name}")
        base = other.config.get("base_model_name_or_path")
        if base0 and base and base != base0:
            raise OrthomergeError(f"{other.path or other.name}: base model {base!r} differs from {base0!r} "
                                  f"of {first.path or first.name}")
        extra = sorted(set(other.modules) ^ set(first.modules))
        if extra:
            who = other if extra[0] in other.A else first
            raise OrthomergeError(f"{_where(who)}: target module {extra[0]!r} is not in every adapter "
                                  "(all adapters must adapt the same modules)")
        for m in first.modules:
            s0 = (first.B[m].shape[0], first.A[m].shape[1])
            s1 = (other.B[m].shape[0], other.A[m].shape[1])
            if s0 != s1:
                raise OrthomergeError(f"{_where(other)}: {m} is {s1[0]}×{s1[1]}, "
                                      f"{first.path or first.name} has {s0[0]}×{s0[1]}")


def task_names(adapters: list[LoraAdapter]) -> list[str]:
    """Folder names for ``tasks/``: the adapter folder names, made unique with ``-2``, ``-3``…"""
    names, seen = [], {}
    for i, a in enumerate(adapters):
        base = a.path.name if a.path else f"task{i}"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def adapter_keys(adapters: list[LoraAdapter], names: list[str]) -> list[str]:
    """A stable identity per adapter for seeding random rules: its task name when it was read from a
    folder (so numerically equal runs give equal masks, whatever the adapters' order or last bits),
    else a digest of its factors (an in-memory adapter has no name of its own)."""
    keys = []
    for adapter, name in zip(adapters, names):
        if adapter.path is not None:
            keys.append(name)
            continue
        h = hashlib.sha256()
        for m in sorted(adapter.modules):
            for t in (adapter.A[m], adapter.B[m]):
                h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
        keys.append(h.hexdigest())
    return keys



def _load_stats(stats, adapters, modules):
    if stats is None:
        raise OrthomergeError("regmean needs statistics: one --stats file per adapter (orthomerge stats)")
    if len(stats) != len(adapters):
        raise OrthomergeError(f"--stats: {len(stats)} files for {len(adapters)} adapters")
    loaded = []
    for item in stats:
        if isinstance(item, (str, Path)):
            from ..stats import load_stats  # lazy: only regmean needs it
            st = load_stats(item)
        else:
            st = item
        have = set(st.modules)
        missing = [m for m in modules if m not in have]
        if missing:
            raise OrthomergeError(f"{item if isinstance(item, (str, Path)) else 'statistics'}: no Gram matrix "
                                  f"for module {missing[0]!r}")
        loaded.append((item, st))
    return loaded


def _choice_ok(value, allowed) -> bool:
    """``allowed``: a type, a tuple of types, or a tuple of values (True/False only match real booleans)."""
    kinds = allowed if isinstance(allowed, tuple) else (allowed,)
    if all(isinstance(k, type) for k in kinds):
        return isinstance(value, kinds)
    return value in kinds and isinstance(value, bool) == isinstance(kinds[0], bool)


def _check_params(spec: MethodSpec, params: dict, count: int) -> None:
    if "density" in params:
        check_density(per_task(params["density"], count, "density"))
    if params.get("trim_scope", "tensor") not in ("tensor", "model"):
        raise OrthomergeError(f"trim_scope={params['trim_scope']!r}: choose tensor or model")
    if params.get("rescale_scope", "model") not in ("model", "module"):
        raise OrthomergeError(f"rescale_scope={params['rescale_scope']!r}: choose model or module")
    for key in ("sign", "normalize", "select", "gram"):
        allowed = {"sign": ("total", "frequency"), "normalize": ("count", "weight"),
                   "select": ("partition", "kthvalue", "sort"), "gram": ("sum", "mean")}[key]
        if key in params and params[key] not in allowed:
            raise OrthomergeError(f"{spec.name}: {key}={params[key]!r}: choose {' or '.join(allowed)}")
    for key, allowed in spec.choices.items():   # non-numeric parameters a method declares
        if not _choice_ok(params.get(key), allowed):
            kinds = allowed if isinstance(allowed, tuple) else (allowed,)
            what = " or ".join(k.__name__ if isinstance(k, type) else str(k) for k in kinds)
            raise OrthomergeError(f"{spec.name}: {key}={params.get(key)!r}: choose {what}")
    for key, value in params.items():
        if key in spec.choices:
            continue
        if key not in ("sign", "normalize", "select", "gram", "trim_scope", "rescale_scope", "rescale", "density"):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise OrthomergeError(f"{spec.name}: parameter {key}={value!r} must be a finite number")


def _resolve_model(model, adapters, notes: list, *, weights: bool, tokenizer: bool, why: str | None):
    """``None`` → the adapters' base, loaded as their task type.

    ``weights``: the merge reads base weights (dense output, data-driven methods, trained biases; ``why``
    says which); otherwise the model is built from its config on the meta device, which is all that
    validating module names and shapes needs. ``tokenizer``: the model will see text (pad token needed).
    """
    if model is not None and not isinstance(model, str):
        return model
    from ..models import class_for_modules, load_model

    spec = model or adapters[0].config.get("base_model_name_or_path")
    if not spec:
        if why:
            raise OrthomergeError(f"{why} needs the base model: pass --model")
        notes.append("base model unknown: adapters validated against each other only")
        return None
    try:
        task_type = adapters[0].task_type
        model_class = class_for_modules(spec, adapters[0].modules) if task_type is None else None
        return load_model(spec, num_labels=adapters[0].num_labels() or 2, task_type=task_type,
                          weights=weights, pad_from_tokenizer=tokenizer, model_class=model_class)
    except OrthomergeError:
        if model is not None or why:
            raise
        notes.append(f"base model {spec!r} not found locally: adapters validated against each other only")
        return None


def model_thresholds(adapters, modules, density) -> list[float]:
    """TIES ``trim_scope="model"``: one exact threshold per task over all its modules (streamed)."""
    dens = per_task(density, len(adapters), "density")
    out = []
    for adapter, d in zip(adapters, dens):
        def chunks(adapter=adapter):
            for m in modules:
                b, a = adapter.factors(m)
                yield b.to(torch.float32) @ a.to(torch.float32)
        out.append(abs_histogram_threshold(chunks, d))
    return out


# ---------------------------------------------------------------- the merge


def _nonempty(b: torch.Tensor, a: torch.Tensor):
    """PEFT needs r ≥ 1: an all-zero update is written as one zero rank."""
    if a.shape[0] == 0:
        return torch.zeros(b.shape[0], 1), torch.zeros(1, a.shape[1])
    return b.contiguous(), a.contiguous()


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


def merge_adapters(adapters, method: str = "task_arithmetic", weights=None, *, space: str | None = None,
                   rank: int | None = None, dense: bool = False, model=None, stats=None, seed: int = 0,
                   svd: str = "auto", progress: bool = False, threads: int | None = None, data=None,
                   tokenizer=None, **params) -> MergeResult:
    """Merge LoRA adapters (folders or :class:`LoraAdapter`) with a registered method.

    ``weights`` (default 1 each) are per task, ``params`` the method's hyper-parameters (``scale`` λ,
    ``density``, …; see ``--list-methods``), ``space`` picks the ``core``/``knots``/``dense``/``factored``
    variant of a base rule by name. ``rank``: re-compress every module to this rank (exact for low-rank
    results; dense results default to Σr). ``dense``: keep dense ΔW for a full merged model (needs the base
    ``model``: a spec string or module; default the adapters' base_model_name_or_path). ``stats``: one
    statistics file (or object with ``gram``/``tokens``/``modules``) per adapter, for ``regmean``.
    ``threads``: torch threads during the merge (see :func:`torch_threads`; default 1).
    ``data``: for data-driven methods (``fisher``, ``adamerging``, ``search``), one item per adapter — a
    :class:`~orthomerge.tasks.Task`, a :class:`~orthomerge.tasks.Split`, a bundled task name or a tasks
    YAML (``file.yaml`` with one task, or ``file.yaml#name``); each method says which split it uses.
    ``tokenizer``: for data-driven methods when ``model`` is a module without a local folder name.
    """
    with torch_threads(threads):
        return _merge(adapters, method, weights, space=space, rank=rank, dense=dense, model=model, stats=stats,
                      seed=seed, svd=svd, progress=progress, params=params, data=data, tokenizer=tokenizer)


def load_data(data, adapters) -> list:
    """One :class:`Task` or :class:`Split` per adapter from tasks, splits, bundled names or tasks YAML files."""
    from ..tasks import Split, Task, load_task, load_tasks

    if data is None:
        return None
    if isinstance(data, (str, Path, Split, Task)):
        data = [data]
    data = list(data)
    if len(data) != len(adapters):
        raise OrthomergeError(f"--data: {len(data)} items for {len(adapters)} adapters (one task per adapter)")
    out = []
    for item in data:
        if isinstance(item, (Split, Task)):
            out.append(item)
            continue
        text = str(item)
        path, _, name = text.partition("#")
        if path.lower().endswith((".yaml", ".yml")):
            tasks = load_tasks([path])
            hits = [t for t in tasks if t.name == name] if name else tasks
            if len(hits) != 1:
                names = ", ".join(t.name for t in tasks)
                raise OrthomergeError(f"--data {text}: name one task of {path} with {path}#NAME (tasks: {names})")
            out.append(hits[0])
        else:
            out.append(load_task(text))
    return out


def _merge(adapters, method, weights, *, space, rank, dense, model, stats, seed, svd, progress,
           params, data=None, tokenizer=None) -> MergeResult:
    t0 = time.perf_counter()
    spec = get_method(method, space)
    adapters = _load(adapters)
    count = len(adapters)
    if weights is None:
        weights = [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise OrthomergeError(f"--weights: {len(weights)} weights for {count} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise OrthomergeError("--weights: weights must be finite numbers")
    if rank is not None and int(rank) < 1:
        raise OrthomergeError(f"--rank {rank}: must be at least 1")
    if svd not in ("auto", "exact", "randomized"):
        raise OrthomergeError(f"svd={svd!r}: choose auto, exact or randomized")
    resolved = spec.resolve(params)
    _check_params(spec, resolved, count)
    validate_compatible(adapters)
    modules = sorted(adapters[0].modules)
    notes: list[str] = []
    biased = [a for a in adapters if a.has_biases]
    if biased and not spec.linear:
        raise OrthomergeError(f"{_where(biased[0])}: has biases (lora_bias or bias={biased[0].config.get('bias')!r}), "
                              f"which merge exactly only with linear methods (task_arithmetic); {spec.name} is "
                              "not linear in the updates")
    needs_weights = ("dense output" if dense else f"{spec.name}" if spec.needs_data else
                     "merging trained biases (bias='lora_only'|'all')" if any(a.biases for a in adapters) else None)
    model = _resolve_model(model, adapters, notes, weights=needs_weights is not None, tokenizer=spec.needs_data,
                           why=needs_weights)
    for note in notes:
        log.warning(note)
    if model is not None:
        for a in adapters:
            validate_adapter(dataclasses.replace(a, heads={}), model, where=_where(a))
    loaded_stats = _load_stats(stats, adapters, modules) if spec.needs_stats else None
    names = task_names(adapters)
    keys = adapter_keys(adapters, names)
    if spec.needs_data:
        if data is None:
            raise OrthomergeError(f"{spec.name} needs task data: one task or split per adapter "
                                  "(data=[...], --data, or 'data:' per adapter in a recipe)")
        if model is None:
            raise OrthomergeError(f"{spec.name} needs the base model to run the data through: pass --model")
    t_load = time.perf_counter() - t0
    prepared, t_prep = None, 0.0
    if spec.prepare is not None:
        s = time.perf_counter()
        ctx = MergeContext(adapters=adapters, names=names, modules=modules, weights=weights, params=resolved,
                           model=model, data=load_data(data, adapters) if spec.needs_data else None,
                           tokenizer=tokenizer, stats=[st for _, st in loaded_stats] if loaded_stats else stats,
                           seed=seed, progress=progress, keys=keys)
        prepared = spec.prepare(ctx)
        t_prep = time.perf_counter() - s

    call = {k: v for k, v in resolved.items() if k not in ("trim_scope", "rescale_scope")}
    if resolved.get("trim_scope") == "model":
        call["thresholds"] = model_thresholds(adapters, modules, resolved["density"])

    t_rule = t_comp = 0.0
    outputs = [""] if not spec.per_task else names           # "" = the one merged update
    factors = {o: ({}, {}) for o in outputs}                   # output -> (B, A) per module
    dense_out = {o: {} for o in outputs} if dense else None
    losses: dict[str, dict] = {}
    shares = [[0.0, 0.0] for _ in range(count)]
    per_module_scale: dict[str, list[float]] = {}
    for m in tqdm(modules, desc=f"merge {spec.name}", unit="module", disable=not progress):
        fac = scaled_factors(adapters, m)
        task = ModuleTask(name=m, factors=fac, weights=weights,
                          seeds=[module_seed(seed, key, m) for key in keys])
        if prepared is not None:
            task.extras = prepared.extras.get(m)
        if loaded_stats is not None:
            task.grams = [st.gram(m) for _, st in loaded_stats]
            task.tokens = [st.tokens(m) for _, st in loaded_stats]
            n = task.shape[1]
            for (where, _), g in zip(loaded_stats, task.grams):
                if tuple(g.shape) != (n, n):
                    raise OrthomergeError(f"{where}: Gram of {m} is {tuple(g.shape)}, expected ({n}, {n})")
                if not torch.isfinite(g).all():
                    raise OrthomergeError(f"{where}: Gram of {m} contains NaN or Inf")
        s = time.perf_counter()
        result = spec.fn(task, **call)
        t_rule += time.perf_counter() - s
        s = time.perf_counter()
        if isinstance(result, PerTask):
            updates = result.updates
            for i in range(count):
                shares[i][0] += result.numer[i]
                shares[i][1] += result.denom[i]
            per_module_scale[m] = [nu / de if de > 0 else 1.0 for nu, de in zip(result.numer, result.denom)]
        else:
            updates = [result]
        sum_r = sum(task.ranks)
        for out_name, upd in zip(outputs, updates):
            key = m if out_name == "" else f"{out_name}:{m}"
            if dense:
                dense_out[out_name][m] = upd.delta if isinstance(upd, Dense) else upd.B @ upd.A
                continue
            if isinstance(upd, LowRank):
                b, a_, loss = recompress_factors(upd.B, upd.A, rank)
            else:
                b, a_, loss = recompress_dense(upd.delta, rank or sum_r, svd)
            factors[out_name][0][m], factors[out_name][1][m] = _nonempty(b, a_)
            losses[key] = loss
        t_comp += time.perf_counter() - s

    if spec.per_task:   # EMR rescalers λ_i, per model (sums over modules) or per module
        for i, out_name in enumerate(outputs):
            for m in modules:
                lam = (shares[i][0] / shares[i][1] if shares[i][1] > 0 else 1.0) \
                    if resolved["rescale_scope"] == "model" else per_module_scale[m][i]
                if dense:
                    dense_out[out_name][m] = dense_out[out_name][m] * lam
                else:
                    factors[out_name][0][m] = factors[out_name][0][m] * lam

    lora_bias, biases = _merge_biases(spec, call, adapters, weights, keys, model) if biased else ({}, {})
    _check_finite(factors, dense_out, {**lora_bias, **biases}, losses)
    meta = {"merge": {"method": spec.name, "params": resolved, "weights": weights, "seed": seed,
                      "adapters": [str(a.path) if a.path else a.name for a in adapters]}}
    merged, tasks = None, {}
    if not dense:
        carried = dict(lora_bias=lora_bias, biases=biases)
        if not spec.per_task:
            merged = LoraAdapter.from_factors(*factors[""], heads={}, base=adapters[0], metadata=meta, **carried)
            if adapters[0].task_type in LABELLED_TASK_TYPES:
                # No head here: without task_type PEFT does not expect modules_to_save (SEQ_CLS would add one).
                merged.config.update(task_type=None, modules_to_save=None)
        for i, (name, a) in enumerate(zip(names, adapters)):
            B, A = factors[name] if spec.per_task else factors[""]
            tasks[name] = LoraAdapter.from_factors(B, A, heads=a.heads, base=a,
                                                   metadata={**meta, "task": name, "head": "own"}, **carried)
        for adapter in [merged, *tasks.values()] if biases else ():
            adapter.config["bias"] = "all" if any(a.config.get("bias") == "all" for a in adapters) else "lora_only"
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
        "timing": {"load_s": t_load, "rule_s": t_rule, "recompress_s": t_comp,
                   "merge_s": time.perf_counter() - t0},
        "notes": notes,
    }
    if prepared is not None:
        report["timing"]["prepare_s"] = t_prep
        report.update(prepared.report)
    if spec.per_task:
        report["rescalers"] = {n: (shares[i][0] / shares[i][1] if shares[i][1] > 0 else 1.0)
                               for i, n in enumerate(names)}
    bias_delta = {f"{m}.bias": v for m, v in lora_bias.items()}
    state = model.state_dict() if biases else {}
    bias_delta.update({k: v - state[k].to(torch.float32) for k, v in biases.items()})
    return MergeResult(method=spec.name, params=resolved, names=names, adapters=adapters, merged=merged,
                       tasks=tasks, dense=dense_out, report=report, model=model, bias_delta=bias_delta)


def _merge_biases(spec: MethodSpec, call: dict, adapters: list[LoraAdapter], weights: list[float],
                  keys: list[str], model) -> tuple[dict, dict]:
    """A linear method applied to the biases as one-column updates: ``lora_B`` biases (``s·b``, PEFT
    ``lora_bias``) and the change of trained biases (``bias='lora_only'|'all'``) against the base.
    A bias an adapter lacks is a zero update. Returns (merged lora_B biases, merged absolute biases)."""
    def merged(name: str, vectors: list[torch.Tensor]) -> torch.Tensor:
        task = ModuleTask(name=name, factors=[(v.to(torch.float32)[:, None], torch.ones(1, 1)) for v in vectors],
                          weights=weights, seeds=[module_seed(0, k, name) for k in keys])
        out = spec.fn(task, **call)
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
            if not (torch.isfinite(B[m]).all() and torch.isfinite(A[m]).all()):
                raise OrthomergeError(f"{m}: the merged update is not finite (NaN or Inf{' for ' + out_name if out_name else ''}); "
                                      "check the weights and scale")
    for deltas in (dense_out or {}).values():
        for m, d in deltas.items():
            if not torch.isfinite(d).all():
                raise OrthomergeError(f"{m}: the merged update is not finite (NaN or Inf); check the weights and scale")
    for name, b in biases.items():
        if not torch.isfinite(b).all():
            raise OrthomergeError(f"{name}: the merged bias is not finite (NaN or Inf); check the weights and scale")
    for key, loss in losses.items():
        if not (math.isfinite(loss.err_sq) and math.isfinite(loss.total_sq)):
            raise OrthomergeError(f"{key}: the merged update's norm overflows (not finite); check the weights and scale")


# ---------------------------------------------------------------- recipes

RECIPE_KEYS = {"method", "merge_method", "adapters", "models", "parameters", "output", "base_model", "model",
               "seed", "space", "dtype"}
ADAPTER_KEYS = {"path", "adapter", "model", "parameters", "weight", "stats", "data"}
PER_ADAPTER_PARAMS = ("weight", "density")


def load_recipe(path: str | Path) -> dict:
    """Parse a mergekit-style YAML recipe into :func:`merge_adapters` arguments (+ ``out``)."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise OrthomergeError(f"{path}: missing") from None
    except yaml.YAMLError as err:
        raise OrthomergeError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise OrthomergeError(f"{path}: a recipe is a mapping with method, adapters, parameters, output")
    unknown = sorted(set(doc) - RECIPE_KEYS)
    if unknown:
        raise OrthomergeError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(RECIPE_KEYS))})")
    method = doc.get("method") or doc.get("merge_method")
    if not method:
        raise OrthomergeError(f"{path}: no 'method'")
    entries = doc.get("adapters") or doc.get("models")
    if not isinstance(entries, list) or not entries:
        raise OrthomergeError(f"{path}: 'adapters' must be a non-empty list")
    here = path.parent

    def local(p):
        p = Path(str(p)).expanduser()
        return p if p.is_absolute() else here / p

    adapters, per, stats, data = [], {k: [] for k in PER_ADAPTER_PARAMS}, [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise OrthomergeError(f"{path}: adapters[{i}] must be a path or a mapping")
        bad = sorted(set(entry) - ADAPTER_KEYS)
        if bad:
            raise OrthomergeError(f"{path}: adapters[{i}]: unknown key {bad[0]!r}")
        where = entry.get("path") or entry.get("adapter") or entry.get("model")
        if not where:
            raise OrthomergeError(f"{path}: adapters[{i}] has no path")
        adapters.append(local(where))
        params = dict(entry.get("parameters") or {})
        if "weight" in entry:
            params["weight"] = entry["weight"]
        bad = sorted(set(params) - set(PER_ADAPTER_PARAMS))
        if bad:
            raise OrthomergeError(f"{path}: adapters[{i}]: per-adapter parameter {bad[0]!r} is not supported "
                                  f"(per adapter: {', '.join(PER_ADAPTER_PARAMS)}; others go in 'parameters')")
        for k in PER_ADAPTER_PARAMS:
            per[k].append(params.get(k))
        stats.append(local(entry["stats"]) if entry.get("stats") else None)
        if entry.get("data"):   # a bundled task name, or a tasks YAML relative to the recipe
            spec = str(entry["data"])
            file, sep, name = spec.partition("#")
            data.append(str(local(file)) + sep + name if local(file).exists() else spec)
        else:
            data.append(None)
    glob = dict(doc.get("parameters") or {})
    kwargs = {"method": method, "space": doc.get("space"), "seed": int(doc.get("seed", 0))}
    if any(w is not None for w in per["weight"]):
        kwargs["weights"] = [1.0 if w is None else w for w in per["weight"]]
    if "weight" in glob:
        raise OrthomergeError(f"{path}: 'weight' is per adapter, not a global parameter")
    if any(d is not None for d in per["density"]):
        default = glob.get("density", get_method(method, doc.get("space")).defaults.get("density"))
        glob["density"] = [default if d is None else d for d in per["density"]]
    if any(s is not None for s in stats):
        if not all(stats):
            raise OrthomergeError(f"{path}: give 'stats' for every adapter or none")
        kwargs["stats"] = stats
    if any(d is not None for d in data):
        if not all(data):
            raise OrthomergeError(f"{path}: give 'data' for every adapter or none")
        kwargs["data"] = data
    output = doc.get("output") or {}
    if not isinstance(output, dict):
        raise OrthomergeError(f"{path}: 'output' must be a mapping (format, rank, path)")
    fmt = output.get("format", "peft")
    if fmt not in ("peft", "dense"):
        raise OrthomergeError(f"{path}: output.format {fmt!r}: choose peft or dense")
    kwargs["dense"] = fmt == "dense"
    if output.get("rank") is not None:
        kwargs["rank"] = int(output["rank"])
    if output.get("svd"):
        kwargs["svd"] = output["svd"]
    base = doc.get("base_model") or doc.get("model")
    if base:
        kwargs["model"] = str(local(base)) if local(base).exists() else str(base)
    kwargs["out"] = local(output["path"]) if output.get("path") else None
    kwargs["adapters"] = adapters
    kwargs["params"] = glob
    return kwargs


def run_recipe(yaml_path: str | Path, out: str | Path | None = None, progress: bool = False,
               threads: int | None = None, overwrite: bool = False) -> MergeResult:
    """Merge as a YAML recipe says and save to ``out`` (or the recipe's ``output.path``)."""
    kwargs = load_recipe(yaml_path)
    target = out or kwargs.pop("out")
    kwargs.pop("out", None)
    if target is None:
        raise OrthomergeError(f"{yaml_path}: no output path (output.path in the recipe, or --out)")
    params = kwargs.pop("params")
    adapters = kwargs.pop("adapters")
    check_output(target, overwrite=overwrite, inputs=[yaml_path, *adapters])
    result = merge_adapters(adapters, progress=progress, threads=threads, **kwargs, **params)
    result.report["recipe"] = str(yaml_path)
    result.save(target, overwrite=overwrite)
    return result
