"""Merge search on the bundled suite: successive halving vs the layer-wise bandit at an equal evaluation budget.

    .venv/bin/python bench/bench_search.py                  # measure, print the table
    .venv/bin/python bench/bench_search.py --write          # also (re)write the "## Merge search: successive
                                                            # halving vs layer-wise (equal budget)" section of
                                                            # BENCHMARKS.md (only that one)

Adapters and tasks as ``bench/bench_learned.py`` (its ``load_or_train``): the experiment's cached LoRAs under
``--adapters`` (default runs/default/adapters/seed0/lora; only read) when every task is there, else trained
here quickly (1 epoch) into a temporary folder; tasks ``load_tasks(--tasks)`` (default: the bundled suite)
at the experiment's default split sizes (``ExperimentConfig``: train / validation / test).

Both strategies search the same candidates (``--methods`` × ``--densities`` × ``--lambdas``, the registered
defaults unless given) on the validation split through ``merge_adapters(adapters, "search", dense=True,
model=<the evaluator's model of the first task>, data=tasks, strategy=..., seed=s)``, as
``Experiment._merge`` calls it. Budget unit: task-example evaluations (``report["search"]["rows_evaluated"]``).
Successive halving runs first at its defaults; the layer-wise search then gets the number of ``episodes``
per fidelity rung whose predicted row count is nearest to halving's: at rung n an episode costs
Σ_tasks min(n, |validation|) rows, plus the greedy plan's full-fidelity score once and the own adapters'
normalising scores once per (task, rung) — the same normalising rows halving pays. Reported per run: the
search's own best validation score (``search.best.score``, normalised, at full validation fidelity), the test
normalised mean of that choice (merged ÷ each task's own adapter on test, each task with its own head,
``TaskEvaluator`` as the experiment), the rows used and the wall clock of the merge call (search, merges and
scoring; not the test evaluation).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks_md import machine_load, write_section  # the bench/ folder is on sys.path when run as a script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_learned import load_or_train, normalised_note  # noqa: E402  (the adapters bench_learned measures)

SECTION = "## Merge search: successive halving vs layer-wise (equal budget)"
SHORT = {"task_arithmetic": "TA", "ties": "TIES", "tsv": "TSV", "iso_c": "ISO-C", "do_merging": "DO",
         "continual": "OPCM"}


def episodes_for(budget: int, sizes: list[int], rungs: list[int]) -> tuple[int, int]:
    """(episodes per rung, predicted rows) of the layer-wise search nearest to ``budget`` rows."""
    per_rung = [sum(min(n, s) for s in sizes) for n in rungs]
    fixed = sum(per_rung) + sum(min(rungs[-1], s) for s in sizes)   # own-adapter normalisers + greedy plan
    per_episode = sum(per_rung)
    lo = max(1, (budget - fixed) // per_episode)
    best = min((lo, lo + 1), key=lambda e: abs(fixed + e * per_episode - budget))
    return best, fixed + best * per_episode


def choice_text(choice: dict) -> str:
    params = choice.get("params") or {}
    name = SHORT.get(choice["method"], choice["method"])
    if "density" in params:
        name += f"({params['density']:g})"
    lam = choice.get("scale", choice.get("lambda"))
    return name if lam is None else f"{name}×{lam:g}"


def plan_text(plan: dict) -> str:
    """Per layer group in order, runs of equal choices joined: ``0-1 TIES(0.2)×1, 2 TA×0.75, …``."""
    out, start, prev, last = [], None, None, None
    for group, choice in plan.items():
        text = choice_text(choice)
        if text != prev:
            if prev is not None:
                out.append(f"{start}{'' if start == last else '–' + last} {prev}")
            start, prev = group, text
        last = group
    out.append(f"{start}{'' if start == last else '–' + last} {prev}")
    return ", ".join(out)


def measure(args) -> tuple[list[dict], dict]:
    import numpy as np
    import torch

    from orthomerge.evaluate import TaskEvaluator, adapter_deltas
    from orthomerge.experiment import ExperimentConfig
    from orthomerge.merge import merge_adapters
    from orthomerge.merge.search import fidelities
    from orthomerge.tasks import load_tasks

    torch.set_num_threads(args.threads)
    c = ExperimentConfig()
    sizes = dict(train_size=args.train_size or c.train_size, val_size=args.val_size or c.val_size,
                 test_size=args.test_size or c.test_size)
    tasks = load_tasks(args.tasks.split(",") if args.tasks else None, **sizes)
    t0 = time.perf_counter()
    adapters, source = load_or_train(tasks, Path(args.adapters), args.model)
    adapters_s = time.perf_counter() - t0
    evaluator = TaskEvaluator(args.model, tasks)
    names = [t.name for t in tasks]
    own = {n: evaluator.score(n, adapter_deltas(a), a.heads, "test") for n, a in zip(names, adapters)}
    grid = {k: v for k, v in (("methods", args.methods), ("lambdas", args.lambdas), ("densities", args.densities))
            if v is not None}
    common = dict(min_samples=args.min_samples, eta=args.eta, **grid)

    def run(strategy: str, seed: int, **extra) -> dict:
        start = time.perf_counter()
        result = merge_adapters(adapters, "search", dense=True, model=evaluator.models[names[0]], data=tasks,
                                threads=args.threads, seed=seed, strategy=strategy, **common, **extra)
        seconds = time.perf_counter() - start
        rep = result.report["search"]
        deltas = {m: result.delta(m) for m in adapters[0].modules}
        norm = [evaluator.score(n, deltas, a.heads, "test") / own[n] if own[n] else float("nan")
                for n, a in zip(names, adapters)]
        best = rep["best"]
        choice = plan_text(best["plan"]) if strategy == "layerwise" else choice_text(best)
        row = {"strategy": strategy, "seed": seed, "block": extra.get("block"), "episodes": extra.get("episodes"),
               "val": float(best["score"]), "test": float(np.nanmean(norm)), "rows": int(rep["rows_evaluated"]),
               "evaluations": int(rep["evaluations"]), "seconds": seconds, "choice": choice,
               "fidelities": rep["fidelities"], "trials": len(rep["trials"])}
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        return row

    seeds = [int(s) for s in args.seeds.split(",")]
    blocks = [int(b) for b in args.blocks.split(",")]
    rows = [run("halving", s) for s in (seeds if args.halving_seeds == "all" else seeds[:1])]
    budget = rows[0]["rows"]
    rungs = fidelities(args.min_samples, max(len(t.validation) for t in tasks), args.eta)
    episodes, predicted = episodes_for(budget, [len(t.validation) for t in tasks], rungs)
    print(f"halving used {budget} rows; layer-wise: {episodes} episodes per rung × rungs {rungs} "
          f"→ {predicted} rows predicted", flush=True)
    for block in blocks:
        for s in seeds:
            row = run("layerwise", s, block=block, episodes=episodes)
            row["predicted"] = predicted
            rows.append(row)
    info = {"source": source, "adapters_s": adapters_s, "tasks": names, "own_test": own, "sizes": sizes,
            "rungs": rungs, "budget": budget, "episodes": episodes, "predicted": predicted, "grid": grid,
            "seeds": seeds, "blocks": blocks, "min_samples": args.min_samples, "eta": args.eta,
            "env": f"{platform.machine()} with {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{args.threads} thread(s)"}
    return rows, info


def table(rows, info, command: str, load: str) -> str:
    import numpy as np

    halving = [r for r in rows if r["strategy"] == "halving"]
    g = info["grid"]
    grid = (f"methods {g.get('methods', 'default')}, densities {g.get('densities', 'default')}, "
            f"λ {g.get('lambdas', 'default')}") if g else ("the registered defaults (task_arithmetic, ties × "
                                                           "densities 0.1/0.2/0.4, tsv, iso_c, do_merging, "
                                                           "continual; × λ 0.25/0.5/0.75/1/1.25)")
    s = info["sizes"]
    lines = [SECTION, "",
             f"Generated by `{command}` on {info['env']}; {load}. Tasks {', '.join(info['tasks'])} (train / "
             f"validation / test {s['train_size']} / {s['val_size']} / {s['test_size']}), MiniLM base, adapters: "
             f"{info['source']}. Both strategies search {grid} with `min_samples` {info['min_samples']}, "
             f"`eta` {info['eta']:g}: fidelity rungs {' → '.join(map(str, info['rungs']))} validation rows per "
             f"task. Budget: halving at its defaults used {info['budget']} task-example evaluations; the "
             f"layer-wise search got `episodes = {info['episodes']}` per rung (predicted {info['predicted']} rows: "
             "episodes × Σ rungs × tasks, plus the greedy plan at full fidelity and the own-adapter normalisers "
             "once per (task, rung)). `merge_adapters(adapters, \"search\", dense=True, model, data=tasks, "
             "strategy, seed)` as `Experiment._merge` calls it; seconds = that call (merges, search, scoring).",
             "",
             "| strategy | block | seed | episodes / rung | rows evaluated | ÷ halving budget | best validation "
             "(search.best.score) | test normalised | seconds | choice |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def line(r, label=None):
        block = "whole model" if r["strategy"] == "halving" else r["block"]
        eps = "—" if r["episodes"] is None else r["episodes"]
        return (f"| {label or r['strategy']} | {block} | {r['seed']} | {eps} | {r['rows']} | "
                f"{r['rows'] / info['budget']:.3f} | {r['val']:.4f} | {r['test']:.4f} | {r['seconds']:.1f} | "
                f"{r['choice']} |")

    def mean_line(group, label, block):
        eps = "—" if group[0]["episodes"] is None else group[0]["episodes"]
        return (f"| **{label} mean** | {block} | {len(group)} seeds | {eps} | "
                f"{np.mean([r['rows'] for r in group]):.0f} | "
                f"{np.mean([r['rows'] for r in group]) / info['budget']:.3f} | "
                f"**{np.mean([r['val'] for r in group]):.4f}** | **{np.mean([r['test'] for r in group]):.4f}** | "
                f"{np.mean([r['seconds'] for r in group]):.1f} | |")

    for r in halving:
        lines.append(line(r))
    if len(halving) > 1:
        lines.append(mean_line(halving, "halving", "whole model"))
    for block in info["blocks"]:
        group = [r for r in rows if r["strategy"] == "layerwise" and r["block"] == block]
        for r in group:
            lines.append(line(r))
        if len(group) > 1:
            lines.append(mean_line(group, "layer-wise", block))
    lines += ["", normalised_note(info) + ". Choice: the winner "
              "(halving: method(density)×λ; layer-wise: per layer group 0–5, runs of equal choices joined; "
              "TA task arithmetic, OPCM continual, DO do_merging). Both scores are the search's own "
              "normalised score at full validation fidelity (search max_length 64) and the test split's "
              "(evaluator max_length 128); test is never seen by either search.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", default=str(ROOT / "runs/default/adapters/seed0/lora"))
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: the bundled suite)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--seeds", default="0,1,2", help="merge seeds (the layer-wise search samples with it)")
    p.add_argument("--halving-seeds", choices=["first", "all"], default="first",
                   help="run halving at the first seed only (default) or at every seed")
    p.add_argument("--blocks", default="1,2", help="layer-wise block sizes (layers per bandit arm set)")
    p.add_argument("--methods", default=None, help="search candidates (default: the registered default)")
    p.add_argument("--lambdas", default=None)
    p.add_argument("--densities", default=None)
    p.add_argument("--min-samples", type=int, default=16)
    p.add_argument("--eta", type=float, default=3.0)
    p.add_argument("--train-size", type=int, default=None, help="development only (default: the experiment's)")
    p.add_argument("--val-size", type=int, default=None, help="development only")
    p.add_argument("--test-size", type=int, default=None, help="development only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = p.parse_args()
    load = machine_load()
    start = time.perf_counter()
    rows, info = measure(args)
    total = time.perf_counter() - start
    command = ".venv/bin/python bench/bench_search.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a != "--write") + (" --write" if args.write else "")
    text = table(rows, info, command, f"{load}, total {total / 60:.1f} min (adapters {info['adapters_s']:.0f} s)")
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
