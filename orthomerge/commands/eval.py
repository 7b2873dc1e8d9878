"""``orthomerge eval``: metrics of an adapter or a merge output, normalised scores and interference."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import MAX_LENGTH, STATS_SAMPLES
from . import add_common, add_output, add_placement, add_task_options, checked_out, named_tasks, placement


def register(sub) -> None:
    e = sub.add_parser("eval", help="evaluate an adapter or a merged result on tasks")
    add_common(e)
    add_placement(e)
    add_task_options(e)
    e.add_argument("--prompt", default="", help="causal-LM tasks: the prompt template the adapter was trained "
                                                "with (default: the adapter's, else '{text}\\nAnswer:')")
    e.add_argument("--max-length", type=int, default=MAX_LENGTH,
                   help=f"tokens per row (longer rows are truncated; default {MAX_LENGTH})")
    e.add_argument("--adapter", required=True, help="adapter folder, or a merge output with tasks/<name>/")
    e.add_argument("--task", nargs="+", required=True)
    e.add_argument("--single", nargs="*", default=None,
                   help="each task's own adapter, in --task order: adds normalised scores and interference")
    e.add_argument("--split", choices=["validation", "test"], default="test")
    add_output(e, "write the metrics as JSON here", required=False, is_file=True)
    e.set_defaults(func=run_eval)


def run_eval(args) -> None:
    import numpy as np

    from ..adapters import load_adapter
    from ..cache import cached_stats, loaded_once
    from ..causal import statistics_rows, task_template
    from ..errors import OrthomergeError
    from ..evaluate import TaskEvaluator, adapter_deltas, interference_matrix
    from ..models import cache_dir
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
    _, tasks = named_tasks(args, args.task)
    first = next(iter(adapters.values()))
    place = placement(args, args.task_type or first.task_type)
    prompt = args.prompt or (first.metadata.get("config") or {}).get("prompt") or None
    evaluator = TaskEvaluator(args.model, tasks, args.max_length, task_type=place["task_type"], prompt=prompt,
                              device=place["device"], dtype=place["dtype"])
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
        targets = sorted({m.split(".")[-1] for m in singles[0].modules})
        base = loaded_once(args.model, **place)
        held = [cached_stats(cache_dir() / "stats", args.model,
                             statistics_rows(t.validation, t.label_names, STATS_SAMPLES, place["task_type"],
                                             task_template(t, prompt), evaluator.tokenizer),
                             targets, args.max_length, base=base, dtype=place["dtype"]) for t in tasks]
        report["interference"] = {"rows_inputs_of": [t.name for t in tasks],
                                  "matrix": interference_matrix(singles, held).round(4).tolist()}
    text = json.dumps(report, indent=2)
    if args.out:
        with atomic_file(args.out) as tmp:
            tmp.write_text(text + "\n")
    print(text)
