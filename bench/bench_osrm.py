"""Foundation benchmarks: statistics overhead over a plain forward, and the OSRM solve's candidate solvers.

Run: ``.venv/bin/python bench/bench_osrm.py`` (statistics table printed, to copy by hand) or
``bench/bench_osrm.py --solve-only --write`` (the solver comparison written to BENCHMARKS.md's
"OSRM solve: candidate solvers" section, with the machine). Goals: statistics time ÷ forward time ≤ 1.15
(issue 2); solve ÷ full ``eigh`` ≤ 0.2 at d = 4096 (issue 14), with the r smallest eigenvectors' subspace
equal to the full solve's (sine of the largest principal angle reported; ≤ 1e-6 wanted).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import scipy
import scipy.linalg
import torch

from orthomerge.models import load_model, load_tokenizer
from orthomerge.osrm import smallest_eigenvectors
from orthomerge.stats import collect_stats
from orthomerge.tasks import load_task


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_stats(samples: int, max_length: int, repeats: int) -> None:
    model, tok = load_model("minilm"), load_tokenizer("minilm")
    texts = load_task("sentiment", train_size=samples, val_size=10, test_size=10).train.texts[:samples]

    def forward():
        with torch.inference_mode():
            for start in range(0, len(texts), 32):
                model(**tok(texts[start:start + 32], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt"))

    def stats(targets, float64):
        return lambda: collect_stats(model, tok, texts, targets, max_length=max_length, batch_size=32,
                                     progress=False, float64=float64)

    forward()  # warm-up
    base = best_of(forward, repeats)
    print(f"| plain forward, {samples} samples, max_length {max_length} | {base:.2f} s | 1.00 |")
    for float64 in (False, True):
        t = best_of(stats(["query", "value"], float64), repeats)
        label = "float64" if float64 else "float32"
        print(f"| statistics for query,value ({label} products, float64 sums) | {t:.2f} s | {t / base:.2f} |")


def library(solver: str):
    """orthomerge's solver, returning (values, vectors as columns) like the others."""
    return lambda s, r: (lambda w, a: (w, a.T))(*smallest_eigenvectors(s, r, solver=solver))


SOLVERS = {   # name → (values ascending, vectors as columns) of the r smallest eigenpairs
    "full `eigh`": lambda s, r: (lambda w, v: (w[:r], v[:, :r]))(*np.linalg.eigh(s)),
    "subset evr": library("subset"),
    "subset evx": lambda s, r: scipy.linalg.eigh(s, subset_by_index=[0, r - 1], driver="evx"),
    "shift-invert Lanczos (certified)": library("shift-invert"),
    "auto (orthomerge's default)": library("auto"),
}


def largest_angle_sine(vectors: np.ndarray, reference: np.ndarray) -> float:
    q, _ = np.linalg.qr(reference)
    return float(np.linalg.norm(vectors - q @ (q.T @ vectors), 2))


def bench_eigh(dims: list[int], rank: int, repeats: int) -> list[str]:
    """Every solver on S = XᵀX/2n (X: 2n × n Gaussian, a full-rank Wishart matrix whose smallest
    eigenvalues crowd at the Marchenko–Pastur edge), repeats interleaved, best of ``repeats``."""
    rows = []
    for n in dims:
        x = np.random.default_rng(0).normal(size=(2 * n, n))
        s = x.T @ x / (2 * n)
        times = {name: [] for name in SOLVERS}
        found = {}
        for repeat in range(repeats):
            names = list(SOLVERS)
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:   # rotate the order
                start = time.perf_counter()
                found[name] = SOLVERS[name](s, rank)
                times[name].append(time.perf_counter() - start)
        full = min(times["full `eigh`"])
        reference = found["full `eigh`"][1]
        for name in SOLVERS:
            best = min(times[name])
            row = (f"| d = {n} | {name} | {best:.3f} s | {np.median(times[name]):.3f} s | {best / full:.2f} | "
                   f"{largest_angle_sine(found[name][1], reference):.1e} |")
            rows.append(row)
            print(row, flush=True)
    return rows


def machine() -> str:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{platform.machine()} with {os.cpu_count()} cores (load average {load} at the start), "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads, OPENBLAS_NUM_THREADS="
            f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, numpy {np.__version__}, "
            f"scipy {scipy.__version__}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dims", default="384,1024,4096")
    parser.add_argument("--solve-only", action="store_true", help="skip the statistics benchmark")
    parser.add_argument("--write", action="store_true", help="write the solver table to BENCHMARKS.md")
    args = parser.parse_args()
    where = machine()
    print(where + "\n")
    if not args.solve_only:
        print("| statistics | time (best of %d) | ÷ forward |\n|---|---|---|" % args.repeats)
        bench_stats(args.samples, args.max_length, args.repeats)
    header = ["| d | solver (r = 8 smallest, float64) | best | median | ÷ full `eigh` (best) | sin largest angle to full |",
              "|---|---|---|---|---|---|"]
    print("\n" + "\n".join(header))
    rows = bench_eigh([int(d) for d in args.dims.split(",")], 8, args.repeats)
    if args.write:
        from benchmarks_md import write_section

        write_section("\n".join([
            "## OSRM solve: candidate solvers (issue 14)", "",
            f"Generated by `bench/bench_osrm.py --solve-only --write --repeats {args.repeats} --dims {args.dims}` "
            f"on {where}; the solvers' runs interleaved, rotating their order each repeat.", "",
            *header, *rows, ""]))
