"""Activation statistics of LoRA target-module inputs, collected from the pre-trained model.

For every distinct module input (q/k/v of a layer share one), per token with padding excluded:
``Σ x xᵀ`` (float64), the token and sample counts, and ``Σ`` of per-sample mean inputs (what the
official OSRM code uses). All entries are sums, so shards combine exactly (:func:`combine_stats`) and
``torchrun`` processes all-reduce into the same file one process writes. Files are safetensors; an
older file's ``::sum`` tensors (``Σ x``, written but never used) are ignored on reading.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .adapters import read_safetensors
from .config import STATS_BATCH_SIZE, STATS_MAX_LENGTH
from .errors import OrthomergeError
from .linalg import all_finite
from .outputs import atomic_file
from .models import find_targets, input_device, mapped_device, model_fingerprint, resolve_targets

FORMAT = "orthomerge.stats/1"
_FIELDS = {"gram": "grams", "mean_sum": "mean_sum"}  # file suffix → attribute (an old "::sum" is ignored)


@dataclass
class ActivationStats:
    """Sums over tokens of each distinct target-module input; ``groups`` maps an input key to its modules."""

    groups: dict[str, list[str]]
    grams: dict[str, torch.Tensor]
    mean_sum: dict[str, torch.Tensor]
    token_count: int
    sample_count: int
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def modules(self) -> list[str]:
        return [m for members in self.groups.values() for m in members]

    def key_of(self, module: str) -> str:
        for key, members in self.groups.items():
            if module in members:
                return key
        raise OrthomergeError(f"{self.where}: no statistics for module {module!r}")

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "statistics"

    def tokens(self, module: str | None = None) -> int:
        return self.token_count

    def gram(self, module: str) -> torch.Tensor:
        """Σ x xᵀ over tokens, float64 [n, n] (stored float32 when collected with ``storage="float32"``:
        converted one module at a time, so the statistics of a whole model stay at the stored size)."""
        return self.grams[self.key_of(module)].to(torch.float64)

    def second_moment(self, module: str) -> torch.Tensor:
        """Per-token uncentred second moment ``S = Σ x xᵀ / N`` (OSRM's per-task statistic)."""
        return self.gram(module) / self.token_count

    def sample_mean(self, module: str) -> torch.Tensor:
        """Average over samples of each sample's mean input (the official code's μ_τ, padding excluded)."""
        return self.mean_sum[self.key_of(module)] / self.sample_count

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for key in self.groups:
            out[f"{key}::gram"] = self.grams[key]
            out[f"{key}::mean_sum"] = self.mean_sum[key]
        return out

    def identity(self) -> dict:
        """What two statistics must share to be combined or used together."""
        return {k: self.meta.get(k) for k in ("fingerprint", "targets", "max_length")}


STORAGE = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class MemoryPlan:
    """What the statistics of a model will hold: per target module its input width and accumulator bytes.

    An upper bound: modules found to share an input in the first batch (q/k/v, gate/up) are stored once."""

    modules: list[tuple[str, int, int]]   # (module, input width n, bytes of Σxxᵀ and Σ per-sample means)
    storage: str

    @property
    def total(self) -> int:
        return sum(b for _, _, b in self.modules)

    def describe(self) -> str:
        widths: dict[int, int] = {}
        for _, n, _ in self.modules:
            widths[n] = widths.get(n, 0) + 1
        parts = ", ".join(f"{count} × {n}²" for n, count in sorted(widths.items()))
        return (f"statistics plan: {len(self.modules)} modules ({parts}), {self.storage} accumulators, "
                f"at most {self.total / 2**30:.2f} GiB")


def memory_plan(model: nn.Module, targets, storage: str = "float64") -> MemoryPlan:
    """The :class:`MemoryPlan` of :func:`collect_stats` on ``model`` for ``targets`` (no forward pass)."""
    if storage not in STORAGE:
        raise OrthomergeError(f"storage {storage!r}: choose {' or '.join(STORAGE)}")
    item = torch.empty((), dtype=STORAGE[storage]).element_size()
    names = find_targets(model, resolve_targets(model, targets))
    widths = [(n, model.get_submodule(n).in_features) for n in names]
    return MemoryPlan([(n, w, (w * w + w) * item) for n, w in widths], storage)


def check_fits(plan: MemoryPlan, available: int | None) -> None:
    """Refuse in one line, before any work, a plan larger than ``available`` bytes (None: no limit)."""
    if available is not None and plan.total > available:
        raise OrthomergeError(f"{plan.describe()}, but only {available / 2**30:.2f} GiB are available; "
                              "use float32 storage, fewer target modules, or more memory")


def available_memory(device) -> int | None:
    """Free bytes where the accumulators live: the CUDA device's free memory, else the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def accumulator_memory(model: nn.Module) -> int | None:
    """Free bytes where :func:`collect_stats` keeps its sums: each CUDA device the model's inputs reach
    (every GPU of a device map), and the host's RAM for modules on the CPU or disk."""
    mapping = getattr(model, "hf_device_map", None)
    devices = {mapped_device(p) for p in mapping.values()} if mapping else {mapped_device(input_device(model))}
    free = [available_memory(d) for d in devices]
    return None if None in free else sum(free)


def collect_stats(model: nn.Module, tokenizer, texts: list[str], targets: list[str],
                  pairs: list[str] | None = None, max_length: int = STATS_MAX_LENGTH, batch_size: int = STATS_BATCH_SIZE,
                  progress: bool = True, model_name: str | None = None, float64: bool = False,
                  storage: str = "float64", max_bytes: int | None = None) -> ActivationStats:
    """One pass of the pre-trained ``model`` (eval mode) over ``texts``; hooks sum each target's input.

    Sums are accumulated in float64. Each batch's ``Xᵀ X`` is a float32 GEMM by default (relative error
    ~1e-7 of that batch's contribution, and ~1.5–2× cheaper than float64 on CPUs); ``float64=True``
    computes every product in float64, e.g. to compare runs that batch the rows differently.
    ``storage="float32"`` keeps the accumulators in float32 (half the memory: what an all-linear 8B model
    needs, see :func:`memory_plan`); ``max_bytes`` refuses, before the first batch, a plan larger than that.

    Under an initialised ``torch.distributed`` group, process ``k`` of ``W`` takes rows ``k, k+W, …`` and
    the sums are all-reduced, so every process returns the statistics of all rows. A model loaded with a
    ``device_map`` (split over GPUs, the CPU and disk) works as it is: each sum lives on its module's
    CUDA device, or on the CPU.
    """
    if not texts:
        raise OrthomergeError("no texts to collect statistics from")
    if pairs is not None and len(pairs) != len(texts):
        raise OrthomergeError("texts and pairs differ in length")
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    rows = list(range(rank, len(texts), world))
    if not rows:
        raise OrthomergeError(f"{len(texts)} rows cannot be split over {world} processes")
    targets = resolve_targets(model, targets)
    names = find_targets(model, targets)
    modules = dict(model.named_modules())
    width = {name: modules[name].in_features for name in names}
    model.eval()

    state = {"mask": None, "masks": {}, "captured": None}
    gram, mean_sum = {}, {}

    product = torch.float64 if float64 else torch.float32
    plan = memory_plan(model, targets, storage)
    check_fits(plan, max_bytes)
    held = STORAGE[storage]
    device = input_device(model)

    def accumulate(key: str, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[:2] != state["mask"].shape:
            raise OrthomergeError(f"module {key!r} does not receive one input per token (input shape "
                                  f"{tuple(x.shape)}); choose other targets")
        if x.device not in state["masks"]:   # a device map spreads the inputs over devices
            state["masks"][x.device] = state["mask"].to(x.device)
        mask = state["masks"][x.device]
        x = x.detach().to(product)   # whatever the model's dtype (bf16 inputs are exact in float32)
        tokens = x[mask]
        if key not in gram:
            n = x.shape[-1]
            # the float64 sums live where float64 is fast and exact enough: on the input's CUDA device, else
            # the CPU (MPS has no float64)
            acc = x.device if x.device.type == "cuda" else torch.device("cpu")
            gram[key] = torch.zeros(n, n, dtype=held, device=acc)
            mean_sum[key] = torch.zeros(n, dtype=torch.float64, device=acc)
        acc = gram[key].device
        gram[key] += (tokens.T @ tokens).to(acc, held)
        weights = mask.to(product)
        per_sample = torch.bmm(weights[:, None, :], x)[:, 0].to(acc, torch.float64)
        mean_sum[key] += (per_sample / weights.sum(1, keepdim=True).to(acc, torch.float64)).sum(0)

    def make_hook(name: str):
        def hook(module, args):
            if state["captured"] is not None:
                state["captured"][name] = args[0]
            else:
                accumulate(name, args[0])
        return hook

    handles = {name: modules[name].register_forward_pre_hook(make_hook(name)) for name in names}
    groups: dict[str, list[str]] = {}
    tokens_seen = samples_seen = 0
    try:
        bar = tqdm(total=len(texts), desc="statistics", unit="sample", disable=not progress or rank != 0)
        for start in range(0, len(rows), batch_size):
            idx = rows[start:start + batch_size]
            batch = tokenizer([texts[i] for i in idx], [pairs[i] for i in idx] if pairs else None,
                              truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
            state["mask"], state["masks"] = batch["attention_mask"].bool(), {}
            first = not groups
            state["captured"] = {} if first else None
            with torch.inference_mode():
                model(**batch)
            if first:
                captured = state["captured"]
                state["captured"] = None
                for name in names:  # identical inputs → one statistic (q/k/v, gate/up)
                    key = next((k for k in groups if captured[k].shape == captured[name].shape
                                and torch.equal(captured[k], captured[name])), None)
                    if key is None:
                        groups[name] = [name]
                        accumulate(name, captured[name])
                    else:
                        groups[key].append(name)
                        handles.pop(name).remove()
            tokens_seen += int(state["mask"].sum())
            samples_seen += len(idx)
            bar.update(len(idx) * world)
        bar.close()
    finally:
        for handle in handles.values():
            handle.remove()
    if distributed:
        # Every process must hold the same groups: the first batch decides them on every rank alike.
        where = next(iter(gram.values())).device   # nccl reduces CUDA tensors, gloo CPU ones
        counts = torch.tensor([tokens_seen, samples_seen], dtype=torch.float64, device=where)
        dist.all_reduce(counts)
        tokens_seen, samples_seen = int(counts[0]), int(counts[1])
        for key in groups:
            for table in (gram, mean_sum):
                dist.all_reduce(table[key])
    meta = {
        "format": FORMAT,
        "model": model_name or model.config.name_or_path,
        "fingerprint": model_fingerprint(model),
        "targets": sorted(targets),
        "max_length": max_length,
        "float64_products": float64,
        "storage": storage,
        "widths": {k: width[k] for k in groups},
    }
    gram = {k: v.cpu() for k, v in gram.items()}
    mean_sum = {k: v.cpu() for k, v in mean_sum.items()}
    return ActivationStats(groups=groups, grams=gram, mean_sum=mean_sum,
                           token_count=tokens_seen, sample_count=samples_seen, meta=meta)


def save_stats(stats: ActivationStats, out: str | Path) -> Path:
    """Write a safetensors file (atomically) with the sums as tensors and counts/identity as metadata."""
    meta = dict(stats.meta, groups=stats.groups, tokens=stats.token_count, samples=stats.sample_count)
    with atomic_file(out) as tmp:
        save_file(stats.tensors(), str(tmp), metadata={"orthomerge": json.dumps(meta, sort_keys=True)})
    stats.path = Path(out)
    return Path(out)


def load_stats(path: str | Path) -> ActivationStats:
    """Read and check a statistics file: metadata present, every tensor there and finite."""
    from safetensors import safe_open

    path = Path(path)
    tensors = read_safetensors(path)
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("orthomerge")
    if raw is None:
        raise OrthomergeError(f"{path}: not an orthomerge statistics file (no metadata)")
    meta = json.loads(raw)
    groups = meta.pop("groups")
    tables = {attr: {} for attr in _FIELDS.values()}
    for key in groups:
        for f, attr in _FIELDS.items():
            name = f"{key}::{f}"
            if name not in tensors:
                raise OrthomergeError(f"{path}: tensor {name!r} missing")
            if not all_finite(tensors[name]):
                raise OrthomergeError(f"{path}: tensor {name!r} contains NaN or Inf")
            tables[attr][key] = tensors[name] if f == "gram" else tensors[name].to(torch.float64)
    tokens, samples = meta.pop("tokens"), meta.pop("samples")
    if tokens <= 0:
        raise OrthomergeError(f"{path}: statistics over zero tokens")
    return ActivationStats(groups=groups, **tables, token_count=tokens, sample_count=samples, meta=meta, path=path)


def combine_stats(parts: list[ActivationStats]) -> ActivationStats:
    """Exact sum of statistics over disjoint shards of the same data source and model."""
    if not parts:
        raise OrthomergeError("no statistics to combine")
    first = parts[0]
    for other in parts[1:]:
        check_same_source(first, other)
    groups = first.groups
    tables = {attr: {k: sum(getattr(p, attr)[k] for p in parts) for k in groups} for attr in _FIELDS.values()}
    return ActivationStats(groups=groups, **tables, token_count=sum(p.token_count for p in parts),
                           sample_count=sum(p.sample_count for p in parts), meta=dict(first.meta))


def check_same_source(a: ActivationStats, b: ActivationStats) -> None:
    """Statistics used together must come from the same model, targets and max_length."""
    for key, va in a.identity().items():
        vb = b.identity()[key]
        if va != vb:
            raise OrthomergeError(f"{b.where}: {key} {vb!r} differs from {a.where}'s {va!r}")
    if a.groups != b.groups:
        raise OrthomergeError(f"{b.where}: module groups differ from {a.where}'s")


def check_matches_model(stats: ActivationStats, model: nn.Module, modules: list[str]) -> None:
    """The statistics were computed on this base model and cover these modules."""
    fingerprint = model_fingerprint(model)
    if stats.meta.get("fingerprint") not in (fingerprint, model_fingerprint(model, torch.float32)):
        raise OrthomergeError(
            f"{stats.where}: computed on model {stats.meta.get('model')!r} "
            f"(fingerprint {stats.meta.get('fingerprint')}), not on this base model ({fingerprint})"
        )
    covered = set(stats.modules)
    missing = [m for m in modules if m not in covered]
    if missing:
        raise OrthomergeError(f"{stats.where}: no statistics for module {missing[0]!r} "
                              f"(collected for targets {stats.meta.get('targets')})")


def init_distributed_from_env(device=None) -> bool:
    """Join a process group when launched by torchrun/accelerate (WORLD_SIZE > 1): nccl when the
    statistics run on CUDA (each process then uses GPU ``LOCAL_RANK``), gloo on the CPU."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True
