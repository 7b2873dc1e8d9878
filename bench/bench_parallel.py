"""Parallelism of the main job's two costs on this machine: scoring (forward passes) and training.

    .venv/bin/python bench/bench_parallel.py            # print the section (about 8 minutes on 2 cores)
    .venv/bin/python bench/bench_parallel.py --write    # also (re)write it in BENCHMARKS.md

Scoring: the six default tasks' test splits (300 rows each, as ``orthomerge experiment`` sizes them) through
MiniLM with ``TaskEvaluator``'s padded batches, in one process at 2 and at 1 torch threads, and over the tasks
in 2 Python threads (1 or 2 torch threads each); then test + validation at several batch sizes. Training:
two tasks (``trec``, ``bbc``: 600 rows, the default ``TrainConfig``) one after the other in one 2-thread
process, then at once in two processes of 2 and of 1 thread each; every result is compared bitwise with
the one-process, 2-thread reference (predictions, or every trained factor and head).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks_md import write_section  # the bench/ folder is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Parallelism of the main job (issue 14)"
TRAIN_TASKS = (1, 2)   # trec, bbc in the default suite's order
REPEATS = 2


def child_train(index: int, threads: int, out: str) -> None:
    """Train one default task with ``threads`` torch threads; save its factors and head to ``out``."""
    import torch

    from orthomerge.tasks import load_tasks
    from orthomerge.train import TrainConfig, train_adapter

    torch.set_num_threads(threads)
    task = load_tasks(None, train_size=600, val_size=100, test_size=300)[index]
    start = time.perf_counter()
    adapter = train_adapter("minilm", task, TrainConfig(), progress=False)
    seconds = time.perf_counter() - start
    torch.save({**{f"A.{m}": adapter.A[m] for m in adapter.A}, **{f"B.{m}": adapter.B[m] for m in adapter.B},
                **{f"head.{k}": v for k, v in adapter.heads.items()}}, out)
    print(json.dumps({"task": task.name, "seconds": seconds}))


def launch(index: int, threads: int, out: Path) -> subprocess.Popen:
    """A child process training default task ``index`` with ``threads`` threads into ``out``."""
    return subprocess.Popen([sys.executable, __file__, "--child-train", str(index), str(threads), str(out)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


def finish(procs: list[subprocess.Popen]) -> dict[str, float]:
    """Wait for training children: task → its training seconds."""
    found = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("a training child failed")
    return {f["task"]: f["seconds"] for f in found}


def train_at_once(threads: int, folder: Path, tag: str) -> tuple[float, dict]:
    """Both training tasks in parallel processes of ``threads`` threads: (wall s, task → its seconds)."""
    start = time.perf_counter()
    each = finish([launch(i, threads, folder / f"{tag}{i}.pt") for i in TRAIN_TASKS])
    return time.perf_counter() - start, each


def same_tensors(a: Path, b: Path) -> tuple[bool, float]:
    import torch

    x, y = torch.load(a), torch.load(b)
    return all(torch.equal(x[k], y[k]) for k in x), max(float((x[k] - y[k]).abs().max()) for k in x)


def scoring_rows() -> list[str]:
    import torch

    from orthomerge.evaluate import TaskEvaluator, predict_batches
    from orthomerge.tasks import load_tasks

    tasks = load_tasks(None, train_size=10, val_size=100, test_size=300)
    names = [t.name for t in tasks]
    old = torch.get_num_threads()

    def timed(evaluator, splits, workers: int, threads: int):
        torch.set_num_threads(threads)

        def score(job):
            name, split = job
            return predict_batches(evaluator.models[name], evaluator.encoded(name, split),
                                   len(getattr(evaluator.tasks[name], split)))
        jobs = [(n, s) for n in names for s in splits]
        best = float("inf")
        for _ in range(REPEATS):
            start = time.perf_counter()
            if workers == 1:
                out = [score(j) for j in jobs]
            else:
                with ThreadPoolExecutor(workers) as pool:
                    out = list(pool.map(score, jobs))
            best = min(best, time.perf_counter() - start)
        return best, out

    evaluator = TaskEvaluator("minilm", tasks)
    for n in names:
        evaluator.encoded(n, "test")
    timed(evaluator, ["test"], 1, old)   # warm-up
    ref_s, ref = timed(evaluator, ["test"], 1, 2)
    rows = [f"| scoring the 6 test splits (1800 rows), 1 process × 2 threads | {ref_s:.2f} s | reference |"]
    for label, workers, threads in (("1 process × 1 thread", 1, 1),
                                    ("2 Python threads over the tasks × 1 torch thread", 2, 1),
                                    ("2 Python threads × 2 torch threads", 2, 2)):
        seconds, out = timed(evaluator, ["test"], workers, threads)
        rows.append(f"| the same, {label} | {seconds:.2f} s ({ref_s / seconds:.2f}× the reference's speed) | "
                    f"{'bitwise' if out == ref else 'no: predictions differ'} |")
    sizes, first = {}, None
    for size in (16, 32, 64, 128, 300):
        ev = TaskEvaluator("minilm", tasks, batch_size=size)
        for n in names:
            ev.encoded(n, "test"), ev.encoded(n, "validation")   # tokenised before the clock starts
        seconds, out = timed(ev, ["test", "validation"], 1, 2)
        first = first if first is not None else out
        sizes[size] = (seconds, out == first)
    torch.set_num_threads(old)
    rows.append("| scoring test + validation, batch " + " / ".join(str(s) for s in sizes) + " rows (default 64) | "
                + " / ".join(f"{s:.1f}" for s, _ in sizes.values()) + " s | "
                + ("same predictions" if all(same for _, same in sizes.values()) else "predictions differ") + " |")
    return rows


def training_rows(folder: Path) -> list[str]:
    seq = {}
    start = time.perf_counter()
    for i in TRAIN_TASKS:   # one after the other
        seq.update(finish([launch(i, 2, folder / f"seq{i}.pt")]))
    seq_wall = time.perf_counter() - start
    names = " then ".join(seq)
    rows = [f"| training {names}, one process × 2 threads each (sequential) | {seq_wall:.0f} s "
            f"({' + '.join(f'{s:.1f}' for s in seq.values())} s of training) | reference |"]
    for threads, tag in ((2, "two"), (1, "one")):
        wall, each = train_at_once(threads, folder, tag)
        checks = [same_tensors(folder / f"seq{i}.pt", folder / f"{tag}{i}.pt") for i in TRAIN_TASKS]
        verdict = ("bitwise" if all(ok for ok, _ in checks)
                   else f"no: factors and heads differ by up to {max(d for _, d in checks):.1e}")
        rows.append(f"| the two at once, 2 processes × {threads} thread{'s' if threads > 1 else ''} | {wall:.0f} s "
                    f"({', '.join(f'{t} {s:.1f} s' for t, s in each.items())}) | {verdict} |")
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-train":
        child_train(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = p.parse_args()
    started, load = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_parallel_") as scratch:
        rows = scoring_rows() + training_rows(Path(scratch))
    text = "\n".join([
        SECTION, "",
        f"Generated by `bench/bench_parallel.py` on {os.uname().machine} with {os.cpu_count()} cores; MiniLM, "
        f"the main job's split sizes; scoring times are the best of {REPEATS}; 1-min load average {load[0]:.2f} "
        f"at the start; {(time.perf_counter() - started) / 60:.0f} min in all.", "",
        "| what | time | same result as the reference? |", "|---|---|---|", *rows, ""])
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
