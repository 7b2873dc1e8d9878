"""``orthomerge train`` (one task's LoRA) and ``orthomerge eval`` (metrics, normalised score, interference)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import add_common, add_output, checked_out


def _task_options(p) -> None:
    p.add_argument("--tasks", default=None, help="tasks.yaml with user tasks (default: the bundled suite)")
    p.add_argument("--train-size", type=int, default=1000)
    p.add_argument("--val-size", type=int, default=200)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--max-length", type=int, default=64)


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune one task's LoRA (and head) with a chosen init")
    add_common(p)
    _task_options(p)
    p.add_argument("--task", required=True, help="task name (bundled, or defined in --tasks)")
    p.add_argument("--init", default="lora", choices=["lora", "osrm", "orthogonal", "lora-unit"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="query,value")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--freeze", choices=["A", "B", "none"], default="none")
    p.add_argument("--subspace-k", type=int, default=0, help="A may rotate only within k lowest-interference "
                                                             "directions (k ≥ rank)")
    p.add_argument("--interference-weight", type=float, default=0.0, help="μ of the interference regulariser")
    p.add_argument("--variant", choices=["paper", "official"], default="paper")
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--other-stats", nargs="*", default=None,
                   help="other tasks' statistics; default: computed from the other tasks and cached")
    p.add_argument("--stats-samples", type=int, default=100)
    add_output(p, "output adapter folder")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="evaluate an adapter or a merged result on tasks")
    add_common(e)
    _task_options(e)
    e.add_argument("--adapter", required=True, help="adapter folder, or a merge output with tasks/<name>/")
    e.add_argument("--task", nargs="+", required=True)
    e.add_argument("--single", nargs="*", default=None,
                   help="each task's own adapter, in --task order: adds normalised scores and interference")
    e.add_argument("--split", choices=["validation", "test"], default="test")
    add_output(e, "write the metrics as JSON here", required=False, is_file=True)
    e.set_defaults(func=run_eval)


def _tasks(args, names: list[str]):
    """(the pool of tasks for OSRM's "other tasks", the named tasks): --tasks YAML or the bundled suite."""
    from ..errors import OrthomergeError
    from ..tasks import load_task, load_tasks

    sizes = dict(train_size=args.train_size, val_size=args.val_size, test_size=args.test_size)
    pool = load_tasks(args.tasks, **sizes)
    by_name = {t.name: t for t in pool}
    for name in names:
        if name not in by_name:
            if args.tasks:
                raise OrthomergeError(f"{args.tasks}: no task named {name!r}")
            by_name[name] = load_task(name, **sizes)
            pool.append(by_name[name])
    return pool, [by_name[n] for n in names]


def _cached_stats(model_spec: str, task, samples: int, max_length: int, targets: list[str], split: str = "train"):
    """Statistics of ``samples`` rows of a task's split, cached under the orthomerge cache folder."""
    from ..models import cache_dir, load_model, load_tokenizer
    from ..stats import collect_stats, load_stats, save_stats

    data = getattr(task, split).take(samples)
    tag = f"{model_spec}|{','.join(targets)}|{max_length}|{task.name}|{split}|{len(data)}|{task.seed}"
    path = cache_dir() / "stats" / (hashlib.sha1(tag.encode()).hexdigest()[:16] + ".safetensors")
    if path.exists():
        return load_stats(path)
    stats = collect_stats(load_model(model_spec), load_tokenizer(model_spec), data.texts, targets,
                          pairs=data.pairs, max_length=max_length, progress=False, model_name=model_spec)
    stats.meta["data"] = tag
    save_stats(stats, path)
    return stats


def run_train(args) -> None:
    from ..adapters import save_adapter
    from ..models import parse_targets
    from ..stats import load_stats
    from ..train import TrainConfig, train_adapter

    checked_out(args, [args.tasks, *(args.other_stats or [])])
    pool, (task,) = _tasks(args, [args.task])
    targets = parse_targets(args.targets)
    config = TrainConfig(init=args.init, rank=args.rank, alpha=args.alpha, targets=targets, lr=args.lr,
                         epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                         seed=args.seed, freeze=args.freeze, variant=args.variant, beta=args.beta,
                         subspace_k=args.subspace_k, interference_weight=args.interference_weight)
    config.check()
    others = own = None
    if config.needs_stats or args.beta:
        if args.other_stats:
            others = [load_stats(p) for p in args.other_stats]
        else:
            others = [_cached_stats(args.model, t, args.stats_samples, args.max_length, targets)
                      for t in pool if t.name != task.name]
        own = _cached_stats(args.model, task, args.stats_samples, args.max_length, targets)
    adapter = train_adapter(args.model, task, config, others=others, own=own, progress=not args.quiet)
    save_adapter(adapter, args.out, overwrite=args.overwrite)
    if not args.quiet:
        print(json.dumps(adapter.metadata["history"], indent=2))


def run_eval(args) -> None:
    import numpy as np

    from ..adapters import load_adapter
    from ..errors import OrthomergeError
    from ..evaluate import TaskEvaluator, adapter_deltas, interference_matrix
    from ..outputs import atomic_file

    if args.out:
        checked_out(args, [args.adapter, args.tasks, *(args.single or [])])
    if args.single is not None and len(args.single) != len(args.task):
        raise OrthomergeError(f"--single: {len(args.single)} adapters for {len(args.task)} tasks")
    root = Path(args.adapter)

    def for_task(name):
        """A merge output's ``tasks/<name>`` (merged update + that task's head), else the adapter itself."""
        if (root / "tasks").is_dir():
            folder = root / "tasks" / name
            if not folder.is_dir():
                have = ", ".join(sorted(p.name for p in (root / "tasks").iterdir() if p.is_dir())) or "none"
                raise OrthomergeError(f"{folder}: missing, so the merge output has no head for task {name!r} "
                                      f"(its tasks: {have})")
            return load_adapter(folder)
        return load_adapter(root)

    adapters = {name: for_task(name) for name in args.task}
    singles = [load_adapter(p) for p in args.single] if args.single is not None else []
    _, tasks = _tasks(args, args.task)
    evaluator = TaskEvaluator(args.model, tasks, args.max_length)
    for t, adapter in [*adapters.items(), *zip(args.task, singles)]:
        evaluator.validate(adapter, t)
    report = {"adapter": str(root), "split": args.split, "metrics": {}}
    for t in tasks:
        adapter = adapters[t.name]
        report["metrics"][t.name] = evaluator.score(t.name, adapter_deltas(adapter), adapter.heads, args.split)
    if args.single is not None:
        own = {t.name: evaluator.score(t.name, adapter_deltas(a), a.heads, args.split)
               for t, a in zip(tasks, singles)}
        report["single"] = own
        report["normalised"] = {n: report["metrics"][n] / own[n] if own[n] else None for n in own}
        report["normalised_mean"] = float(np.nanmean([v for v in report["normalised"].values() if v is not None]))
        held = [_cached_stats(args.model, t, 100, args.max_length,
                              sorted({m.split(".")[-1] for m in singles[0].modules}), "validation") for t in tasks]
        report["interference"] = {"rows_inputs_of": [t.name for t in tasks],
                                  "matrix": interference_matrix(singles, held).round(4).tolist()}
    text = json.dumps(report, indent=2)
    if args.out:
        with atomic_file(args.out) as tmp:
            tmp.write_text(text + "\n")
    print(text)
