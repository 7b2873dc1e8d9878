"""Merging benchmark: orthomerge vs PEFT ``add_weighted_adapter`` on synthetic large LoRA modules and on
real trained MiniLM task adapters.

Every measurement runs in its own subprocess (time with ``perf_counter``, peak RSS from ``getrusage``),
on the same seeded adapters: one module of shape m×n (4096×4096, 14336×4096), T = 3 or 8 adapters, r = 16,
weights 1. The PEFT side wraps a single ``nn.Linear`` with PEFT and calls ``add_weighted_adapter`` with
``svd_rank = T·r`` (so ``svd`` is exact, like our factored result). Errors are relative Frobenius errors
against a dense float64 reference of the same rule, computed after the timed part.

    .venv/bin/python bench/bench_merge.py             # default plan (~10 min on 2 cores)
    .venv/bin/python bench/bench_merge.py --quick     # 1024×1024 only, seconds
    .venv/bin/python bench/bench_merge.py --write     # also replace the "## Merging" section of BENCHMARKS.md
    .venv/bin/python bench/bench_merge.py --real runs/default/adapters/seed0/lora --write
        # the trained task adapters in that folder (all their modules), own section "## Merging real adapters"

With ``--real`` both sides merge the same factors (scale folded into B): ours from ``LoraAdapter`` objects,
PEFT on a stand-in module holding one ``nn.Linear`` per adapted module of the real model (the merge touches
only the LoRA layers, so the rest of the model does not enter either timing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks_md import write_section  # the bench/ folder is on sys.path when run as a script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
R = 16
MODULE = "lin"
THREADS = 2   # --threads; the same for both sides


# ---------------------------------------------------------------- child side


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_factors(m: int, n: int, t: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(m, R, generator=g) * 0.01, torch.randn(R, n, generator=g) / n**0.5) for _ in range(t)]


def case_factors(case: dict) -> dict[str, list]:
    """Module → ``[(s·B, A)]`` per adapter: the real adapters of ``case["adapters"]``, or seeded synthetic ones."""
    if case.get("adapters"):
        from orthomerge.adapters import load_adapter

        adapters = [load_adapter(path) for path in case["adapters"]]
        return {mod: [tuple(x.float() for x in ad.factors(mod)) for ad in adapters] for mod in adapters[0].modules}
    return {MODULE: make_factors(case["m"], case["n"], case["t"])}


def sizes_mb(factors: dict) -> tuple[float, float]:
    """(all adapters' factors, the largest dense ΔW) in MiB of float32: the memory goal's two terms."""
    adapters = sum(b.numel() + a.numel() for fs in factors.values() for b, a in fs) * 4 / 2**20
    dense = max(fs[0][0].shape[0] * fs[0][1].shape[1] for fs in factors.values()) * 4 / 2**20
    return adapters, dense


def dense_sum(factors):
    return sum(b.double() @ a.double() for b, a in factors)


def dense_spectral(method: str, factors):
    """Dense float64 reference of TSV-M / Iso-C from full SVDs of the dense matrices (paper definitions)."""
    import torch

    def svd(x):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        rho = int((s > max(x.shape) * torch.finfo(torch.float32).eps * s[0]).sum())
        return u[:, :rho], s[:rho], vh[:rho]

    def polar(x):
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        return u @ vh

    if method == "iso_c":
        u, s, vh = svd(dense_sum(factors))
        return s.mean() * u @ vh
    us, ss, vhs = zip(*[svd(b.double() @ a.double()) for b, a in factors])
    return polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vhs, 0).T).T


def rel(got: dict, ref: dict) -> float:
    """Relative Frobenius error over all modules together."""
    import torch

    num = sum(float(torch.linalg.vector_norm(got[k].double() - ref[k].double())) ** 2 for k in ref)
    return (num / sum(float(torch.linalg.vector_norm(ref[k].double())) ** 2 for k in ref)) ** 0.5


FACTORED = ("task_arithmetic", "tsv", "iso_c")
REPEATS = 5


def reference_qr_svd(factors: dict) -> float:
    """Seconds of the bare work of a factored spectral merge, batched over modules of one shape: thin QR
    of the stacked Bs and of the stacked Aᵀs (float64) and the SVD of every Σr × Σr core."""
    import torch

    from orthomerge.merge.engine import torch_threads

    groups: dict = {}
    for fs in factors.values():
        groups.setdefault((fs[0][0].shape[0], fs[0][1].shape[1], sum(a.shape[0] for _, a in fs)), []).append(fs)
    with torch_threads(None):   # the merge's own thread count
        start = time.perf_counter()
        for group in groups.values():
            B = torch.stack([torch.cat([b for b, _ in fs], 1) for fs in group]).to(torch.float64)
            A = torch.stack([torch.cat([a for _, a in fs], 0) for fs in group]).to(torch.float64)
            _, rb = torch.linalg.qr(B)
            _, ra = torch.linalg.qr(A.mT)
            torch.linalg.svd(rb @ ra.mT)
        return time.perf_counter() - start


def child_ours(case: dict) -> dict:
    import torch

    from orthomerge.adapters import LoraAdapter
    from orthomerge.merge import merge_adapters
    from orthomerge.merge.elementwise import ties_kernel
    from orthomerge.merge.registry import ModuleUpdates

    t, method = case["t"], case["method"]
    params = {"density": 0.2} if method in ("ties", "dare_ties") else {}
    if method == "dare_ties":
        params["density"] = 0.5

    def adapters_of(factors: dict):
        return [LoraAdapter(A={mod: fs[i][1] for mod, fs in factors.items()},
                            B={mod: fs[i][0] for mod, fs in factors.items()},
                            scaling={mod: 1.0 for mod in factors}) for i in range(t)]

    merge_adapters(adapters_of({MODULE: make_factors(64, 64, t)}), method, **params)   # warm-up: code pages
    factors = case_factors(case)
    adapters = adapters_of(factors)
    base = rss_mb()
    start = time.perf_counter()
    result = merge_adapters(adapters, method, **params)
    seconds = time.perf_counter() - start
    peak = peak_mb() - base
    out = {}
    if method in FACTORED:   # best of a few runs, beside the bare QR + SVD reference (alternating); time_s
        runs, refs = [seconds], []   # stays the first run, as PEFT's single run it is compared with
        for _ in range(REPEATS):
            refs.append(reference_qr_svd(factors))
            start = time.perf_counter()
            merge_adapters(adapters, method, **params)
            runs.append(time.perf_counter() - start)
        out.update(best_s=min(runs), ref_s=min(refs), vs_ref=min(runs) / min(refs))
    adapters_mb, dense_mb = sizes_mb(factors)
    out.update({"time_s": seconds, "peak_mb": peak, "rule_s": result.report["timing"]["rule_s"],
           "recompress_s": result.report["timing"]["recompress_s"], "adapters_mb": adapters_mb,
           "dense_mb": dense_mb, "recompress_rel_error": result.report["total"]["rel_error"],
           "rank": max(result.merged.rank(mod) for mod in factors)})
    got = {mod: result.merged.delta(mod) for mod in factors}
    if method == "task_arithmetic":
        out["error"] = rel(got, {mod: dense_sum(fs) for mod, fs in factors.items()})
    elif method in ("tsv", "iso_c") and case.get("ref"):
        out["error"] = rel(got, {mod: dense_spectral(method, fs) for mod, fs in factors.items()})
    elif method == "ties":
        tasks = [ModuleUpdates(mod, fs, [1.0] * t) for mod, fs in factors.items()]
        s = time.perf_counter()
        fast = {task.name: ties_kernel(task, density=0.2, select="partition") for task in tasks}
        out["rule_partition_s"] = time.perf_counter() - s
        if case.get("sort", True):
            s = time.perf_counter()
            slow = {task.name: ties_kernel(task, density=0.2, select="sort") for task in tasks}
            out["rule_sort_s"] = time.perf_counter() - s
            out["partition_vs_sort_error"] = rel(fast, slow)
    return out


def child_peft(case: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    t, kind = case["t"], case["method"]
    factors = case_factors(case)
    attr = {mod: mod.replace(".", "_") for mod in factors}   # one Linear per adapted module
    ranks = [modules[0][1].shape[0] for modules in zip(*factors.values())]   # per adapter: rank of its A

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            for mod, fs in factors.items():
                setattr(self, attr[mod], nn.Linear(fs[0][1].shape[1], fs[0][0].shape[0], bias=False))

    def config(r):
        return LoraConfig(r=r, lora_alpha=r, target_modules=list(attr.values()))

    model = get_peft_model(Holder(), config(ranks[0]), adapter_name="a0")
    for i in range(1, t):
        model.add_adapter(f"a{i}", config(ranks[i]))
    layers = {mod: getattr(model.base_model.model, attr[mod]) for mod in factors}
    with torch.no_grad():
        for mod, fs in factors.items():
            for i, (b, a) in enumerate(fs):
                layers[mod].lora_A[f"a{i}"].weight.copy_(a)
                layers[mod].lora_B[f"a{i}"].weight.copy_(b)
    names = [f"a{i}" for i in range(t)]
    kwargs = {"density": 0.2} if kind == "ties_svd" else ({"density": 0.5} if kind == "dare_ties_svd" else {})
    with torch.no_grad():   # warm-up on a tiny matrix: library code pages are not merge memory
        torch.linalg.svd(torch.randn(64, 64), full_matrices=True)
    base = rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        model.add_weighted_adapter(names, [1.0] * t, "merged", combination_type=kind, svd_rank=sum(ranks),
                                   **kwargs)
    seconds = time.perf_counter() - start
    out = {"time_s": seconds, "peak_mb": peak_mb() - base}
    got = {mod: layer.get_delta_weight("merged").detach() for mod, layer in layers.items()}
    if kind == "svd":
        out["error"] = rel(got, {mod: dense_sum(fs) for mod, fs in factors.items()})
    elif kind == "ties_svd":
        from orthomerge.merge.elementwise import ties_kernel
        from orthomerge.merge.registry import ModuleUpdates

        ref = {mod: ties_kernel(ModuleUpdates(mod, fs, [1.0] * t), density=0.2) for mod, fs in factors.items()}
        out["truncation_error"] = rel(got, ref)
    return out


# ---------------------------------------------------------------- parent side


def measure(impl: str, method: str, m: int, n: int, t: int, **extra) -> dict:
    case = {"impl": impl, "method": method, "m": m, "n": n, "t": t, **extra}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
                                         "OPENBLAS_NUM_THREADS": str(THREADS)})
    if proc.returncode != 0:
        return {**case, "failed": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {impl:5} {method:16} {m}x{n} T={t}: " + ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
    return {**case, **res}


def plan(quick: bool):
    if quick:
        shapes, peft = [(1024, 1024)], {(1024, 1024, 3): ["svd", "ties_svd", "dare_ties_svd"],
                                       (1024, 1024, 8): ["svd"]}
    else:
        shapes = [(1024, 1024), (4096, 4096), (14336, 4096)]
        # PEFT's dense full SVD dominates and costs minutes per call on 2 cores: run it where the budget allows.
        peft = {(1024, 1024, 3): ["svd", "ties_svd", "dare_ties_svd"], (1024, 1024, 8): ["svd"],
                (4096, 4096, 3): ["svd", "ties_svd", "dare_ties_svd"], (4096, 4096, 8): ["svd"]}
    return shapes, peft


def fmt(x, spec=".3g"):
    return "n/a" if x is None else format(x, spec)


def table(rows: list[dict], peft_sizes: dict) -> str:
    by = {(r["impl"], r["method"], r["m"], r["n"], r["t"]): r for r in rows}
    lines = [
        "| shape | T | method | ours s | PEFT s | speed-up | ours error | PEFT error | ours peak MB | PEFT peak MB"
        " | budget MB (2×(adapters+dense)) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pairs = [("task_arithmetic", "svd"), ("tsv", "svd"), ("iso_c", "svd"), ("ties", "ties_svd"),
             ("dare_ties", "dare_ties_svd")]
    for (m, n, t) in sorted({(r["m"], r["n"], r["t"]) for r in rows}):
        for ours_name, peft_name in pairs:
            o = by.get(("ours", ours_name, m, n, t), {})
            p = by.get(("peft", peft_name, m, n, t), {})
            if not o:
                continue
            budget = 2 * (o["adapters_mb"] + o["dense_mb"])
            speed = o["time_s"] and p.get("time_s") and p["time_s"] / o["time_s"]
            err_o = o.get("error", o.get("recompress_rel_error") if ours_name in ("ties", "dare_ties") else None)
            err_p = p.get("error", p.get("truncation_error"))
            lines.append(f"| {o.get('label', f'{m}×{n}')} | {t} | {ours_name} vs {peft_name} | {fmt(o.get('time_s'))} | "
                         f"{fmt(p.get('time_s')) if p else 'not run'} | {fmt(speed, '.1f' if speed < 10 else '.0f') + '×' if speed else 'n/a'}"
                         f" | {fmt(err_o)} | {fmt(err_p)} | {fmt(o.get('peak_mb'), '.0f')} | "
                         f"{fmt(p.get('peak_mb'), '.0f') if p else 'n/a'} | {budget:.0f} |")
    lines += ["", "Factored merges against the bare work they cannot avoid: a thin QR of the stacked Bs and "
              "of the stacked Aᵀs and an SVD of each Σr × Σr core (float64, batched over the modules of one "
              "shape), timed in the same process, alternating; best of "
              f"{REPEATS + 1} merges / {REPEATS} references:", "",
              "| shape | T | method | ours s | reference s | ours ÷ reference |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["impl"] == "ours" and r.get("ref_s"):
            lines.append(f"| {r.get('label') or str(r['m']) + '×' + str(r['n'])} | {r['t']} | {r['method']} | "
                         f"{fmt(r['best_s'])} | {fmt(r['ref_s'])} | {r['vs_ref']:.2f} |")
    lines += ["", "TIES trim by selection vs full sort (the rule only, no re-compression):", "",
              "| shape | T | partition s | full sort s | speed-up | max difference (rel) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["impl"] == "ours" and r["method"] == "ties":
            sp = r.get("rule_sort_s") and r["rule_sort_s"] / r["rule_partition_s"]
            lines.append(f"| {r.get('label') or str(r['m']) + '×' + str(r['n'])} | {r['t']} | {fmt(r.get('rule_partition_s'))} | "
                         f"{fmt(r.get('rule_sort_s'))} | {fmt(sp, '.1f') + '×' if sp else 'n/a'} | "
                         f"{fmt(r.get('partition_vs_sort_error'))} |")
    return "\n".join(lines)


def bench_real(folder: Path, write: bool) -> None:
    """Ours vs PEFT on every module of the real adapters in ``folder``'s subfolders, one run."""
    paths = sorted(str(p) for p in folder.iterdir() if (p / "adapter_config.json").is_file())
    if len(paths) < 2:
        sys.exit(f"{folder}: needs at least two adapter folders (subfolders with adapter_config.json)")
    factors = case_factors({"adapters": paths})
    (b, a) = next(iter(factors.values()))[0]
    label = f"real: {len(factors)} modules {b.shape[0]}×{a.shape[1]}, r = {a.shape[0]}"
    case = {"adapters": paths, "m": b.shape[0], "n": a.shape[1], "t": len(paths), "label": label, "ref": True}
    rows, start = [], time.perf_counter()
    for method in ("task_arithmetic", "tsv", "iso_c", "dare_ties", "ties"):
        rows.append(measure("ours", method, **case))
    for kind in ("svd", "ties_svd", "dare_ties_svd"):
        rows.append(measure("peft", kind, **case))
    total = time.perf_counter() - start
    failed = [r for r in rows if "failed" in r]
    text = table([r for r in rows if "failed" not in r], {})
    print("\n" + text + "".join(f"\nfailed: {r['impl']} {r['method']}: {r['failed']}" for r in failed))
    if write:
        import torch

        names = ", ".join(Path(p).name for p in paths)
        head = (f"## Merging real adapters\n\nGenerated by `bench/bench_merge.py --real {folder} --threads "
                f"{THREADS} --write` on {platform.machine()} with {os.cpu_count()} CPUs, torch {torch.__version__};"
                f" total {total:.0f} s. The trained task adapters {names} (all their modules, weights 1); PEFT "
                f"`add_weighted_adapter` with `svd_rank = Σr` on the same factors. Errors against dense float64 "
                f"references of each rule over all modules together.\n\n")
        write_section(head + text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="1024×1024 only")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="BLAS/OpenMP threads per measurement, both sides (1 is steadier on a shared machine)")
    ap.add_argument("--no-peft-t8", action="store_true", help="skip PEFT at 4096×4096, T = 8 (saves ~2 min)")
    ap.add_argument("--real", metavar="DIR",
                    help="instead: merge the trained PEFT adapters in DIR's subfolders (e.g. an experiment's)")
    args = ap.parse_args()
    globals()["THREADS"] = args.threads
    if args.child:
        case = json.loads(args.child)
        sys.path.insert(0, str(ROOT))
        print(json.dumps(child_ours(case) if case["impl"] == "ours" else child_peft(case)))
        return
    if args.real:
        return bench_real(Path(args.real), args.write)
    shapes, peft = plan(args.quick)
    if args.no_peft_t8:
        peft.pop((4096, 4096, 8), None)
    rows, start = [], time.perf_counter()
    for m, n in shapes:
        for t in (3, 6, 8):
            for method in ("task_arithmetic", "tsv", "iso_c", "dare_ties"):
                rows.append(measure("ours", method, m, n, t, ref=m * n <= 1024 * 1024))
            rows.append(measure("ours", "ties", m, n, t, sort=not (m > 4096 and t == 8)))
            for kind in peft.get((m, n, t), []):
                rows.append(measure("peft", kind, m, n, t))
    total = time.perf_counter() - start
    failed = [r for r in rows if "failed" in r]
    text = table([r for r in rows if "failed" not in r], peft)
    print("\n" + text)
    if failed:
        print("\nfailed:", *[f"{r['impl']} {r['method']} {r['m']}x{r['n']} T={r['t']}: {r['failed']}" for r in failed],
              sep="\n")
    print(f"\ntotal benchmark time {total:.0f} s")
    if args.write:
        import torch

        head = (f"## Merging\n\nGenerated by `bench/bench_merge.py` on {platform.machine()} with "
                f"{os.cpu_count()} CPUs, torch {torch.__version__}, {THREADS} BLAS thread(s) per measurement; "
                f"total {total:.0f} s. One module per case, r = {R}, weights 1, PEFT `add_weighted_adapter` with "
                f"`svd_rank = T·r` and its defaults otherwise.\n\n")
        write_section(head + text)


if __name__ == "__main__":
    main()
