"""Side by side with another checkout: the main job's wall time and numbers, and the data-driven merges' time.

    .venv/bin/python bench/bench_speed.py --baseline ../base            # both parts, print the section
    .venv/bin/python bench/bench_speed.py --baseline ../base --write    # also (re)write it in BENCHMARKS.md
    .venv/bin/python bench/bench_speed.py --baseline ../base --parts merges --merge-baseline ../older

``--baseline DIR`` is a checkout of orthomerge (e.g. ``git worktree add ../base <commit>``); both sides run
with this venv's Python and packages, each with its own checkout first on ``PYTHONPATH``, in fresh
processes, alternating which side goes first, ``--runs`` times each.

* ``experiment``: ``orthomerge experiment --out TMP --quiet`` (what ``make experiment`` runs) into a new
  folder each time (nothing cached); wall time per run, and every number of the two sides' results.json
  compared at the report's printed precision (3 decimals), timings, the command and the config left out.
* ``merges``: ``merge_adapters(adapters, "fisher" | "adamerging", dense=True, model, data=tasks)`` on the
  trained adapters of ``--adapters`` (as ``Experiment._merge`` calls it), wall time of that call in a fresh
  process with the default (2) torch threads; ``--merge-baseline`` names the checkout to compare with
  (default ``--baseline``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Speed: side by side with an earlier checkout (issue 14)"
IGNORED = {"seconds", "train_seconds", "validation_seconds", "reused_runs", "command", "config", "train_config"}


def env_for(checkout: Path) -> dict:
    """This environment with ``checkout`` first on the import path and the Hub offline."""
    return {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def flat_numbers(obj, prefix: str = "") -> dict[str, float]:
    """Every number of a results.json, keyed by its path (ignored keys left out), rounded as printed."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in IGNORED:
                out.update(flat_numbers(v, f"{prefix}/{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(flat_numbers(v, f"{prefix}[{i}]"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = round(float(obj), 3)
    return out


def run_experiment(checkout: Path, keep: Path | None = None) -> tuple[float, dict]:
    """One main-job run in a new folder: (wall seconds, its numbers); the folder is moved to ``keep`` (if
    given and free) or removed."""
    out = Path(tempfile.mkdtemp(prefix="bench_speed_")) / "run"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orthomerge.cli", "experiment", "--out", str(out), "--quiet"],
                          env=env_for(checkout), capture_output=True, text=True, cwd=checkout)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"experiment in {checkout} failed:\n{done.stderr[-3000:]}")
    numbers = flat_numbers(json.loads((out / "results.json").read_text()))
    if keep is not None and not keep.exists():
        shutil.move(str(out), str(keep))
    shutil.rmtree(out.parent, ignore_errors=True)
    return wall, numbers


MERGE_CHILD = """
import json, sys, time, glob, torch
from orthomerge.adapters import load_adapter
from orthomerge.merge import merge_adapters
from orthomerge.models import load_model
from orthomerge.tasks import load_tasks
method, folder, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
tasks = load_tasks(names, train_size=800, val_size=150, test_size=400)
adapters = [load_adapter(f"{folder}/{n}") for n in names]
model = load_model("minilm", num_labels=2)
start = time.perf_counter()
result = merge_adapters(adapters, method=method, dense=True, model=model, data=tasks)
seconds = time.perf_counter() - start
norms = [float(result.delta(m).double().norm()) for m in adapters[0].modules]
print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(), "norms": norms}))
"""


def run_merge(checkout: Path, method: str, adapters: str, tasks: str) -> tuple[float, list[float]]:
    """One data-driven merge in a fresh process: (seconds, the Frobenius norm of each merged module's ΔW)."""
    done = subprocess.run([sys.executable, "-c", MERGE_CHILD, method, adapters, tasks], env=env_for(checkout),
                          capture_output=True, text=True, cwd=checkout)
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    if done.returncode or not lines:
        sys.exit(f"{method} in {checkout} failed:\n{done.stderr[-3000:]}")
    found = json.loads(lines[-1])
    return found["seconds"], found["norms"]


def commit_of(checkout: Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return done.stdout.strip()[:80] or str(checkout)


def stats(values: list[float]) -> str:
    return f"{min(values):.0f} / {statistics.median(values):.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="an earlier orthomerge checkout")
    p.add_argument("--merge-baseline", default=None, help="checkout for the merges part (default --baseline)")
    p.add_argument("--parts", default="experiment,merges")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--merge-runs", type=int, default=2)
    p.add_argument("--adapters", default=str(ROOT / "runs/default/adapters/seed0/lora"))
    p.add_argument("--tasks", default="sentiment,trec,sms_spam")
    p.add_argument("--keep", default=None, help="move this checkout's first experiment run here (e.g. "
                                                  "runs/default: its report and adapters)")
    p.add_argument("--note", default="")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    args.adapters = str(Path(args.adapters).resolve())   # each side's child runs in its own checkout
    sides = {"baseline": Path(args.baseline).resolve(), "this": ROOT}
    parts = args.parts.split(",")
    started, load = time.perf_counter(), os.getloadavg()
    lines = [SECTION, ""]
    if "experiment" in parts:
        walls, numbers = {k: [] for k in sides}, {k: None for k in sides}
        mismatches = []
        for r in range(args.runs):
            for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                wall, found = run_experiment(sides[side], Path(args.keep) if args.keep and side == "this" else None)
                walls[side].append(wall)
                print(f"experiment {side} run {r + 1}: {wall:.0f} s", flush=True)
                if numbers[side] is None:
                    numbers[side] = found
                elif found != numbers[side]:
                    mismatches.append(f"{side} run {r + 1} differs from its own first run")
        a, b = numbers["baseline"], numbers["this"]
        differing = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        ratio = min(walls["this"]) / min(walls["baseline"])
        lines += [f"`orthomerge experiment` (the main job, nothing cached), {args.runs} runs each, alternating; "
                  f"baseline `{commit_of(sides['baseline'])}`, this `{commit_of(ROOT)}`.", "",
                  "| side | wall s (runs) | minimum / median |", "|---|---|---|"]
        for side in sides:
            lines.append(f"| {side} | {', '.join(f'{w:.0f}' for w in walls[side])} | {stats(walls[side])} |")
        median = statistics.median(walls["this"]) / statistics.median(walls["baseline"])
        lines += ["", f"This ÷ baseline: {ratio:.2f} (minimum), {median:.2f} (median). "
                      f"results.json: {len(a)} numbers compared at 3 decimals, "
                      + (f"{len(differing)} differ (first: {differing[:5]})" if differing else "all equal")
                      + (f"; {'; '.join(mismatches)}" if mismatches else "") + "."]
    if "merges" in parts:
        base = Path(args.merge_baseline).resolve() if args.merge_baseline else sides["baseline"]
        merge_sides = {"baseline": base, "this": ROOT}
        lines += ["", f"Data-driven merges (`merge_adapters(..., dense=True, model, data)`, tasks {args.tasks}, "
                      f"adapters `{args.adapters}`), {args.merge_runs} fresh processes each, alternating; baseline "
                      f"`{commit_of(base)}`; results: the largest relative difference between the two sides' "
                      "per-module ‖ΔW‖:", "",
                  "| method | baseline s (runs) | this s (runs) | speed-up (best) | results, max rel. difference |",
                  "|---|---|---|---|---|"]
        for method in ("fisher", "adamerging"):
            times, norms = {k: [] for k in merge_sides}, {}
            for r in range(args.merge_runs):
                for side in (list(merge_sides) if r % 2 == 0 else list(merge_sides)[::-1]):
                    seconds, norms[side] = run_merge(merge_sides[side], method, args.adapters, args.tasks)
                    times[side].append(seconds)
                    print(f"{method} {side}: {seconds:.1f} s", flush=True)
            differ = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(norms["baseline"], norms["this"]))
            lines.append(f"| {method} | {', '.join(f'{t:.1f}' for t in times['baseline'])} | "
                         f"{', '.join(f'{t:.1f}' for t in times['this'])} | "
                         f"{min(times['baseline']) / min(times['this']):.2f}× | {differ:.1e} |")
    lines += ["", f"Machine: {platform.machine()}, {os.cpu_count()} cores; 1-min load average {load[0]:.2f} at the "
                  f"start, {os.getloadavg()[0]:.2f} at the end; total {(time.perf_counter() - started) / 60:.0f} min."
              + (f" {args.note}" if args.note else "")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from benchmarks_md import write_section

        write_section(text)


if __name__ == "__main__":
    main()
