"""``orthomerge init`` (OSRM-initialised adapter) and ``orthomerge post`` (project a trained LoRA)."""
from __future__ import annotations

import json

from ..config import TrainConfig
from . import add_common, add_dataclass_options, add_output, add_placement, checked_out, placement


def _osrm_options(p) -> None:
    p.add_argument("--other-stats", nargs="+", required=True, help="statistics files of the other tasks")
    p.add_argument("--own-stats", default=None, help="this task's statistics (for --beta)")
    add_dataclass_options(p, TrainConfig, only=("variant", "beta"))


def register(sub) -> None:
    p = sub.add_parser("init", help="write an OSRM-initialised LoRA adapter (B = 0) ready for training")
    add_common(p)
    add_placement(p)
    _osrm_options(p)
    add_dataclass_options(p, TrainConfig, only=("targets", "rank", "alpha"))
    p.add_argument("--num-labels", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the (random) classifier head")
    add_output(p, "output adapter folder")
    p.set_defaults(func=run_init)

    q = sub.add_parser("post", help="convert a trained LoRA to the OSRM subspace (lossy; reports energy kept)")
    _osrm_options(q)
    q.add_argument("--adapter", required=True)
    add_output(q, "output adapter folder")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=run_post)


def _check_beta(args) -> None:
    """The library says "needs the task's own statistics"; on the command line that is --own-stats."""
    from ..errors import OrthomergeError

    if args.beta and not args.own_stats:
        raise OrthomergeError(f"--beta {args.beta:g} needs this task's statistics (--own-stats)")


def run_init(args) -> None:
    from ..adapters import from_peft_model, new_peft_model, save_adapter
    from ..models import load_model, parse_targets
    from ..osrm import init_peft_model_osrm
    from ..stats import load_stats

    checked_out(args, [*args.other_stats, args.own_stats])
    _check_beta(args)
    others = [load_stats(p) for p in args.other_stats]
    own = load_stats(args.own_stats) if args.own_stats else None
    place = placement(args)
    model = load_model(args.model, num_labels=args.num_labels, seed=args.seed, **place)
    peft_model = new_peft_model(model, parse_targets(args.targets), args.rank, args.alpha,
                                task_type=place["task_type"])
    meta = init_peft_model_osrm(peft_model, others, own=own, beta=args.beta, variant=args.variant)
    save_adapter(from_peft_model(peft_model, metadata=meta), args.out, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {args.out}: OSRM ({args.variant}) init, rank {args.rank}, "
              f"{len(peft_model.targeted_module_names)} modules")


def run_post(args) -> None:
    from ..adapters import load_adapter, save_adapter
    from ..osrm import post_convert
    from ..stats import load_stats

    checked_out(args, [args.adapter, *args.other_stats, args.own_stats])
    _check_beta(args)
    adapter = load_adapter(args.adapter)
    others = [load_stats(p) for p in args.other_stats]
    own = load_stats(args.own_stats) if args.own_stats else None
    new, report = post_convert(adapter, others, args.variant, own, args.beta)
    save_adapter(new, args.out, overwrite=args.overwrite)
    if not args.quiet:
        print(json.dumps({"retained_fraction": report["retained_fraction"],
                          "retained_energy": report["retained_energy"]}, indent=2))
