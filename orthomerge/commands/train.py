"""``orthomerge train``: one task's LoRA (and head), with a chosen init."""
from __future__ import annotations

import json

from ..config import STATS_SAMPLES, TrainConfig
from . import (add_common, add_dataclass_options, add_output, add_placement, add_task_options, checked_out,
               dataclass_from_args, named_tasks, placement)


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune one task's LoRA (and head) with a chosen init")
    add_common(p)
    add_task_options(p)
    p.add_argument("--task", required=True, help="task name (bundled, or defined in --tasks)")
    add_dataclass_options(p, TrainConfig)
    add_placement(p, task_type=False)   # --task-type is TrainConfig's
    p.add_argument("--other-stats", nargs="*", default=None,
                   help="other tasks' statistics; default: computed from the other tasks and cached")
    p.add_argument("--stats-samples", type=int, default=STATS_SAMPLES,
                   help="training rows per task for the computed statistics")
    add_output(p, "output adapter folder")
    p.set_defaults(func=run_train)


def run_train(args) -> None:
    from ..adapters import save_adapter
    from ..cache import cached_stats, loaded_once
    from ..causal import statistics_rows
    from ..models import cache_dir, parse_targets
    from ..stats import load_stats
    from ..train import train_adapter

    checked_out(args, [args.tasks, *(args.other_stats or [])])
    pool, (task,) = named_tasks(args, [args.task])
    config = dataclass_from_args(TrainConfig, args, targets=parse_targets(args.targets))
    config.check()
    others = own = None
    if config.needs_stats or args.beta:
        base = loaded_once(args.model, **placement(args, config.task_type))

        def stats(t):
            rows = statistics_rows(t.train, t.label_names, args.stats_samples, config.task_type, config.prompt or None)
            return cached_stats(cache_dir() / "stats", args.model, rows, config.targets, config.max_length,
                                base=base)

        others = ([load_stats(p) for p in args.other_stats] if args.other_stats else
                  [stats(t) for t in pool if t.name != task.name])
        own = stats(task)
    adapter = train_adapter(args.model, task, config, others=others, own=own, progress=not args.quiet,
                            device=args.device, dtype=args.dtype)
    save_adapter(adapter, args.out, overwrite=args.overwrite)
    if not args.quiet:
        print(json.dumps(adapter.metadata["history"], indent=2))
