"""``orthomerge stats`` and ``orthomerge combine-stats``."""
from __future__ import annotations

from ..config import STATS_BATCH_SIZE, STATS_MAX_LENGTH, TARGETS
from . import add_common, add_output, add_placement, checked_out, placement


def register(sub) -> None:
    p = sub.add_parser("stats", help="collect activation statistics of target-module inputs from a data file")
    add_common(p)
    add_placement(p)
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="spread a model larger than one device over GPUs, the CPU and disk (accelerate): auto, "
                        "balanced, sequential, or a JSON file / object of module → device (instead of --device)")
    p.add_argument("--offload-folder", default=None,
                   help="where --device-map puts modules mapped to disk (default: a temporary folder)")
    p.add_argument("--data", required=True, help="CSV, TSV or JSONL file with a text column")
    p.add_argument("--targets", default=",".join(TARGETS), help="LoRA target modules, e.g. query,value (auto: PEFT's default for the architecture; "
                        "all-linear: every linear module but the head)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--text-pair-column", default=None, help="second text column for pair tasks")
    p.add_argument("--max-samples", type=int, default=None, help="first N rows (file order)")
    p.add_argument("--max-length", type=int, default=STATS_MAX_LENGTH)
    p.add_argument("--batch-size", type=int, default=STATS_BATCH_SIZE)
    p.add_argument("--float64", action="store_true",
                   help="float64 products per batch (default: float32 products, float64 sums)")
    p.add_argument("--storage", choices=("float64", "float32"), default="float64",
                   help="accumulator precision: float32 halves the memory (an all-linear 8B model needs it)")
    p.add_argument("--max-memory", type=float, default=None, metavar="GiB",
                   help="refuse before any work when the statistics plan exceeds this (default: the free "
                        "memory where they accumulate)")
    add_output(p, "output .safetensors file", is_file=True)
    p.set_defaults(func=run_stats)

    c = sub.add_parser("combine-stats", help="add statistics of disjoint shards into one file (exact)")
    c.add_argument("parts", nargs="+", help="statistics files")
    add_output(c, "output .safetensors file", is_file=True)
    c.set_defaults(func=run_combine)


def run_stats(args) -> None:
    import os

    import torch
    import torch.distributed as dist

    from ..config import DEFAULT_DEVICE
    from ..errors import OrthomergeError
    from ..models import load_model, load_tokenizer, parse_device_map, parse_targets
    from ..stats import accumulator_memory, collect_stats, init_distributed_from_env, memory_plan, save_stats
    from ..tasks import read_table

    checked_out(args, [args.data])
    if args.max_samples is not None and args.max_samples < 1:
        raise OrthomergeError(f"--max-samples must be ≥ 1, got {args.max_samples}")
    columns = [args.text_column] + ([args.text_pair_column] if args.text_pair_column else [])
    rows = read_table(args.data, columns)[: args.max_samples]
    texts = [str(r[args.text_column]) for r in rows]
    pairs = [str(r[args.text_pair_column]) for r in rows] if args.text_pair_column else None
    where = placement(args)
    if args.device_map is not None:
        if args.device != DEFAULT_DEVICE:
            raise OrthomergeError("--device-map places the model itself: leave --device out")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise OrthomergeError("--device-map splits one model over devices; under torchrun each process "
                                  "holds its own copy: use --device instead")
        where.update(device=None, device_map=parse_device_map(args.device_map), offload_folder=args.offload_folder)
    distributed = init_distributed_from_env(where["device"])
    if distributed and where["device"].type == "cuda" and where["device"].index is None:
        where["device"] = torch.device("cuda", torch.cuda.current_device())   # this process's GPU
    model = load_model(args.model, **where)
    targets = parse_targets(args.targets)
    plan = memory_plan(model, targets, args.storage)
    if not args.quiet:
        print(plan.describe())
    limit = int(args.max_memory * 2**30) if args.max_memory is not None else accumulator_memory(model)
    stats = collect_stats(model, load_tokenizer(args.model), texts, targets, pairs=pairs,
                          max_length=args.max_length, batch_size=args.batch_size, progress=not args.quiet,
                          model_name=args.model, float64=args.float64, storage=args.storage, max_bytes=limit)
    stats.meta["data"] = str(args.data)
    if not distributed or dist.get_rank() == 0:
        save_stats(stats, args.out)
        if not args.quiet:
            print(f"wrote {args.out}: {stats.sample_count} samples, {stats.token_count} tokens, "
                  f"{len(stats.groups)} distinct inputs for {len(stats.modules)} modules")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def run_combine(args) -> None:
    from ..stats import combine_stats, load_stats, save_stats

    checked_out(args, args.parts)
    combined = combine_stats([load_stats(p) for p in args.parts])
    combined.meta["data"] = [p.meta.get("data") for p in map(load_stats, args.parts)]
    save_stats(combined, args.out)
