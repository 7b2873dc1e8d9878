"""Data-driven and learned merging on the bundled suite: time of each method relative to task arithmetic.

    .venv/bin/python bench/bench_learned.py                 # measure, print the table
    .venv/bin/python bench/bench_learned.py --write         # also (re)write the "## Data-driven and learned
                                                            # merging" section of BENCHMARKS.md (only that one)

Adapters: the experiment's cached LoRAs under ``--adapters`` (default runs/default/adapters/seed0/lora; only
read) when all tasks are there, else trained here quickly (``train_adapter("minilm", ...)``, small sizes,
into a temporary folder). Tasks: the experiment's default splits (``ExperimentConfig`` train / validation / test sizes),
so the data-driven methods see the rows the experiment gives them (fisher: train; adamerging, search:
validation) and never test. Each merge is ``merge_adapters(..., dense=True, model=minilm, data=tasks)``
single-threaded at the registered defaults, exactly as ``Experiment._merge`` runs it; the time is that
call's wall clock (best of ``--repeat`` for the sub-second methods). Quality, for orientation only: λ chosen
on validation from {0.25, 0.5, 0.75, 1} for methods with a ``scale`` (as the experiment) and from that grid
plus {1.5, 2, 3}, then the test normalised mean (merged ÷ each task's own adapter). adamerging and search fit on validation, so their
validation-chosen numbers are not comparable to the data-free ones' λ choice — the test column is.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks_md import write_section  # the bench/ folder is on sys.path when run as a script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## Data-driven and learned merging"
METHODS = ["task_arithmetic", "ties", "continual", "do_merging", "doge", "fisher", "adamerging", "search"]
LAMBDAS = [0.25, 0.5, 0.75, 1.0]            # the experiment's default grid
WIDE = LAMBDAS + [1.5, 2.0, 3.0]            # also lets averaging rules (fisher) reach the scale of a sum


def normalised_note(info: dict) -> str:
    """What "test normalised" means in a table, with the own adapters' test scores."""
    return ("Test normalised = mean over tasks of merged ÷ own-adapter test metric (own adapters: " +
            ", ".join(f"{k} {v:.3f}" for k, v in info["own_test"].items()) + ")")


def load_or_train(tasks, folder: Path, model: str):
    from orthomerge.adapters import load_adapter, save_adapter
    from orthomerge.train import TrainConfig, train_adapter

    if all((folder / t.name / "adapter_config.json").exists() for t in tasks):
        return [load_adapter(folder / t.name) for t in tasks], f"cached experiment adapters ({folder})"
    out = Path(tempfile.mkdtemp(prefix="bench_learned_"))
    config = TrainConfig(lr=1e-2, epochs=1)
    adapters = []
    for t in tasks:
        a = train_adapter(model, t, config, progress=False)
        save_adapter(a, out / t.name)
        adapters.append(a)
    return adapters, f"trained here (1 epoch, r = {config.rank}, {len(tasks[0].train)} rows each)"


def measure(args) -> tuple[list[dict], dict]:
    import numpy as np
    import torch

    from orthomerge.evaluate import TaskEvaluator, adapter_deltas
    from orthomerge.experiment import ExperimentConfig
    from orthomerge.merge import get_method, merge_adapters
    from orthomerge.tasks import load_tasks

    torch.set_num_threads(1)
    c = ExperimentConfig()
    tasks = load_tasks(args.tasks.split(","), train_size=c.train_size, val_size=c.val_size, test_size=c.test_size)
    adapters, source = load_or_train(tasks, Path(args.adapters), args.model)
    evaluator = TaskEvaluator(args.model, tasks)
    names = [t.name for t in tasks]
    own = {s: {n: evaluator.score(n, adapter_deltas(a), a.heads, s) for n, a in zip(names, adapters)}
           for s in ("validation", "test")}

    def normalised(deltas, lam, split):
        return float(np.mean([evaluator.score(n, {m: d * lam for m, d in deltas.items()}, a.heads, split) / own[split][n]
                              for n, a in zip(names, adapters)]))

    rows = []
    for method in args.methods.split(","):
        spec = get_method(method)
        params = {"scale": 1.0} if "scale" in spec.defaults else {}
        times = []
        for _ in range(args.repeat if method in ("task_arithmetic", "ties", "continual", "do_merging") else 1):
            model = evaluator.models[names[0]]                # W₀: scoring patches ΔW in only while it scores
            start = time.perf_counter()
            result = merge_adapters(adapters, method, dense=True, model=model, threads=1,
                                    data=tasks if spec.needs_data else None, **params)
            times.append(time.perf_counter() - start)
        row = {"method": method, "seconds": min(times), "prepare_s": result.report["timing"].get("prepare_s", 0.0)}
        if not args.no_quality:
            deltas = {m: result.delta(m) for m in adapters[0].modules}
            lams = WIDE if "scale" in spec.defaults else [1.0]
            curve = {lam: normalised(deltas, lam, "validation") for lam in lams}

            def pick(grid):
                return max((lam for lam in curve if lam in grid or len(lams) == 1),
                           key=lambda lam: (curve[lam], -abs(lam - 1)))
            best, wide = pick(LAMBDAS), pick(WIDE)
            row.update(lam=best, val=curve[best], test=normalised(deltas, best, "test"), lam_wide=wide,
                       test_wide=normalised(deltas, wide, "test") if wide != best else None)
        if method == "search":
            b = result.report["search"]["best"]
            row["note"] = f"chose {b['method']} {b['params'] or ''} λ={b['lambda']}, {result.report['search']['evaluations']} task evaluations"
        if method == "adamerging":
            rep = result.report["adamerging"]
            row["note"] = (f"entropy {np.mean(list(rep['entropy_init'].values())):.3f} → "
                           f"{np.mean(list(rep['entropy_final'].values())):.3f}")
        rows.append(row)
        print(row, flush=True)
    base = next(r["seconds"] for r in rows if r["method"] == "task_arithmetic")
    for r in rows:
        r["relative"] = r["seconds"] / base
    info = {"source": source, "tasks": names, "own_test": own["test"],
            "env": f"{platform.machine()} with {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread"}
    return rows, info


def table(rows, info, command: str) -> str:
    lines = [SECTION, "",
             f"Generated by `{command}` on {info['env']}. Tasks {', '.join(info['tasks'])} "
             f"(the experiment's default splits), MiniLM base, adapters: {info['source']}. Each method at its "
             "registered defaults, `merge_adapters(..., dense=True, model, data=tasks)` as `Experiment._merge` "
             "runs it; time = that call's wall clock (best of 3 for the sub-second methods), including the "
             "data-driven part (`prepare`: Fisher passes, AdaMerging steps, the search's merges and evaluations).",
             "",
             "| method | seconds | × task arithmetic | of which data/model passes s | λ (val, ≤ 1) | test normalised "
             "| λ (val, ≤ 3) | test normalised | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lam = f"{r['lam']:g}" if "lam" in r else "n/a"
        test = f"{r['test']:.3f}" if "test" in r else "n/a"
        wide = f"{r['lam_wide']:g}" if "lam_wide" in r else "n/a"
        test_wide = test if r.get("test_wide") is None else f"{r['test_wide']:.3f}"
        lines.append(f"| {r['method']} | {r['seconds']:.3g} | {r['relative']:.3g}× | {r['prepare_s']:.3g} | {lam} | "
                     f"{test} | {wide} | {test_wide} | {r.get('note', '')} |")
    lines += ["", "λ is chosen on validation from the experiment's grid {0.25, 0.5, 0.75, 1} and, second pair of "
              "columns, from that grid plus {1.5, 2, 3} (methods without a `scale` — adamerging, search — are "
              "scored as they are). " +
              normalised_note(info) + "; one seed, for orientation "
              "only — the experiment report is the comparison. Defaults: fisher 256 train rows per task, exact "
              "per-example expected Fisher; adamerging layer-wise, 100 steps × 16 validation inputs per task; "
              "search over task_arithmetic, ties (3 densities), tsv, iso_c, do_merging, continual × 5 λ by "
              "successive halving (16 → 48 → 144 → all validation rows, η = 3); doge 400 Adam steps per module.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", default=str(ROOT / "runs/default/adapters/seed0/lora"))
    p.add_argument("--tasks", default="sentiment,trec,sms_spam")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--model", default="minilm")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-quality", action="store_true", help="time only")
    p.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = p.parse_args()
    rows, info = measure(args)
    text = table(rows, info, ".venv/bin/python bench/bench_learned.py" + (" --write" if args.write else ""))
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
