"""Foundation benchmarks: statistics overhead over a plain forward, and OSRM's subset eigensolver.

Run: ``.venv/bin/python bench/bench_osrm.py`` (results go to BENCHMARKS.md by hand, with the machine).
Goals (issue 2): statistics time ÷ forward time ≤ 1.15; subset eigh ÷ full eigh ≤ 0.2 at d = 384, 4096.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
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


def bench_eigh(dims: list[int], rank: int, repeats: int) -> None:
    for n in dims:
        x = np.random.default_rng(0).normal(size=(2 * n, n))
        s = x.T @ x / (2 * n)
        full = best_of(lambda: smallest_eigenvectors(s, rank, subset=False), repeats)
        subset = best_of(lambda: smallest_eigenvectors(s, rank, subset=True), repeats)
        print(f"| d = {n}, r = {rank}, float64 | {full:.3f} s | {subset:.3f} s | {subset / full:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}\n")
    print("| statistics | time (best of %d) | ÷ forward |\n|---|---|---|" % args.repeats)
    bench_stats(args.samples, args.max_length, args.repeats)
    print("\n| OSRM solve | full eigh | subset eigh | ratio |\n|---|---|---|---|")
    bench_eigh([384, 4096], 8, args.repeats)
