"""``orthomerge train``: one task's LoRA (and head), with a chosen init."""
from __future__ import annotations

import json
from dataclasses import fields

from ..config import PROTOCOLS, STATS_SAMPLES, TrainConfig
from . import (add_common, add_dataclass_options, add_output, add_placement, add_task_options, checked_out,
               named_tasks, placement)


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune one task's LoRA (and head) with a chosen init")
    add_common(p)
    add_task_options(p)
    p.add_argument("--task", required=True, help="task name (bundled, or defined in --tasks)")
    add_dataclass_options(p, TrainConfig, unset=True)   # options not given take the --protocol preset's values
    p.add_argument("--protocol", default="default", choices=list(PROTOCOLS),
                   help="preset of the training options (explicit options override it); paper: the official "
                        "OSRM code's recipe — lr 4e-4, linear schedule with 6%% warm-up, weight decay 0, batch 64, "
                        "max length 128, gradient norm clipped at 1, best epoch on validation, r 8, α 16 on "
                        "PEFT's default targets (query,value) — epochs and precision left to you (default default)")
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
    from ..causal import statistics_rows, task_template
    from ..models import cache_dir, load_tokenizer
    from ..stats import load_stats
    from ..train import train_adapter

    checked_out(args, [args.tasks, *(args.other_stats or [])])
    pool, (task,) = named_tasks(args, [args.task])
    config = train_config(args)
    others = own = None
    if config.needs_stats or config.beta or config.compensate:   # compensate scales A by the own energy
        base = loaded_once(args.model, **placement(args, config.task_type))
        tokenizer = load_tokenizer(args.model)

        def stats(t):
            rows = statistics_rows(t.train, t.label_names, args.stats_samples, config.task_type,
                                   task_template(t, config.prompt), tokenizer)
            return cached_stats(cache_dir() / "stats", args.model, rows, config.targets, config.max_length,
                                base=base, dtype=args.dtype)

        others = ([load_stats(p) for p in args.other_stats] if args.other_stats else
                  [stats(t) for t in pool if t.name != task.name])
        own = stats(task)
    adapter = train_adapter(args.model, task, config, others=others, own=own, progress=not args.quiet,
                            device=args.device, dtype=args.dtype)
    if _main_process():   # under torchrun / accelerate launch every process holds the same adapter
        save_adapter(adapter, args.out, overwrite=args.overwrite)
        if not args.quiet:
            print(json.dumps(adapter.metadata["history"], indent=2))


def train_config(args) -> TrainConfig:
    """The ``--protocol`` preset with the options given on the command line applied over it, checked."""
    from ..models import parse_targets

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if "targets" in given:
        given["targets"] = parse_targets(given["targets"])
    config = TrainConfig.protocol(args.protocol, **given)
    config.check()
    return config


def _main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
