"""``orthomerge experiment`` (the main job) and ``orthomerge report``."""
from __future__ import annotations

import shlex

from . import add_common, add_placement


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(sub) -> None:
    p = sub.add_parser("experiment", help="train per-task LoRAs (standard and OSRM), merge with every method, "
                                          "evaluate, write report.md/results.json/plots")
    add_common(p)
    add_placement(p)
    p.set_defaults(model=None, device=None, dtype=None)   # unset: the preset's (or ExperimentConfig's) own
    p.add_argument("--prompt", default=None, help="causal-LM tasks (--task-type causal_lm): the prompt template "
                                                  "over {text} (and {pair}); default '{text}\\nAnswer:'")
    p.add_argument("--safety", type=int, default=None, metavar="N",
                   help="causal LMs: run the safety check on N prompts of each bundled set for the base, every "
                        "adapter and every merge (0: off, the default)")
    p.add_argument("--tasks", default=None, help="bundled task names (comma-separated) or a tasks.yaml; "
                                                 "default: the bundled suite")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 small tasks, few methods (minutes)")
    p.add_argument("--out", default="runs/default", help="output folder (adapters are cached there)")
    p.add_argument("--inits", type=_list, default=None, help="arms, e.g. lora,osrm,orthogonal,lora-unit")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1)")
    p.add_argument("--methods", type=_list, default=None, help="merge methods (see merge --list-methods), or all")
    p.add_argument("--lambdas", type=_floats, default=None, help="λ grid, chosen on validation")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--study", action="store_true",
                   help="the OSRM study: 8 tasks, 5 seeds; arms lora, gaussian (the paper's baseline), osrm, "
                        "orthogonal, lora-unit, osrm-selective, osrm-beta (β chosen on validation), compensated "
                        "frozen-A and projected OSRM, post; task arithmetic over λ 0.1…1.0 and TIES; the "
                        "number-of-tasks curve (resumes when run again with the same --out)")
    p.set_defaults(func=run_experiment)

    r = sub.add_parser("report", help="re-render report.md and plots from a results.json")
    r.add_argument("results")
    r.set_defaults(func=run_report)


def build_config(args):
    from dataclasses import replace

    from ..experiment import ExperimentConfig

    config = ExperimentConfig.quick() if args.quick else ExperimentConfig()
    if args.study:
        config = ExperimentConfig.study()
    overrides = {}
    if args.tasks:
        overrides["tasks"] = args.tasks if args.tasks.endswith((".yaml", ".yml")) else _list(args.tasks)
    for name in ("model", "device", "dtype", "inits", "methods", "lambdas", "train_size", "safety"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.seeds is not None:
        overrides["seeds"] = list(range(args.seeds))
    train = {k: getattr(args, k) for k in ("epochs", "lr", "rank", "task_type", "prompt")
             if getattr(args, k) is not None}
    if train:
        overrides["train"] = replace(config.train, **train)
    return replace(config, **overrides)


def run_experiment(args) -> None:
    from ..experiment import Experiment
    from ..outputs import check_output
    from ..report import write_report

    check_output(args.out, resume=True, inputs=[args.tasks] if args.tasks and args.tasks.endswith(
        (".yaml", ".yml")) else [])
    Experiment(build_config(args), args.out, progress=not args.quiet,
               command="orthomerge " + shlex.join(args.argv)).run()
    report = write_report(f"{args.out}/results.json")
    if not args.quiet:
        print(f"wrote {report} (and results.json, lambda_curves.png, per_task.png, interference.png)")


def run_report(args) -> None:
    from ..report import write_report

    print(write_report(args.results))
