"""``report.md`` and PNG plots from an experiment's ``results.json`` (pure rendering, no training)."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import OrthomergeError, atomic_file

CONTRASTS = [("osrm", "lora"), ("osrm", "orthogonal"), ("orthogonal", "lora"), ("lora-unit", "lora")]


def _t95(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def mean_std(values) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of per-seed differences a − b with a 95% t-interval (none for one seed)."""
    d = np.asarray(a) - np.asarray(b)
    n = len(d)
    half = _t95(n) * d.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": float(d.mean()), "low": float(d.mean() - half), "high": float(d.mean() + half), "n": n}


def _fmt_diff(d: dict) -> str:
    if d["n"] > 1:
        return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
    return f"{d['mean']:+.3f} (1 seed, no interval)"


def summarise(results: dict) -> dict:
    """Per arm and method: per-seed normalised test means, chosen λs and per-task scores."""
    table = defaultdict(lambda: defaultdict(lambda: {"norm": {}, "raw": {}, "lambda": {}, "tasks": {}}))
    single = defaultdict(dict)
    for run in results["runs"]:
        arm, seed = run["arm"], run["seed"]
        single[arm][seed] = run["single"]["test"]
        for merge in run["merges"]:
            cell = table[merge["method"]][arm]
            cell["norm"][seed] = merge["test_normalised_mean"]
            cell["raw"][seed] = merge["test_mean"]
            cell["lambda"][seed] = merge["lambda"]
            cell["tasks"][seed] = merge["test_normalised"]
    return {"table": table, "single": single}


def contrasts(summary: dict, arms: list[str]) -> list[tuple[str, str, str, dict]]:
    """(method, arm a, arm b, paired difference) for the key contrasts present in the run."""
    out = []
    for method, cells in summary["table"].items():
        if method == "heads_only":
            continue
        for a, b in CONTRASTS:
            if a in arms and b in arms and a in cells and b in cells:
                seeds = sorted(set(cells[a]["norm"]) & set(cells[b]["norm"]))
                out.append((method, a, b, paired_difference([cells[a]["norm"][s] for s in seeds],
                                                            [cells[b]["norm"][s] for s in seeds])))
    return out


def render_markdown(results: dict, command: str = "") -> str:
    cfg = results["config"]
    arms = list(dict.fromkeys(r["arm"] for r in results["runs"]))
    seeds = sorted({r["seed"] for r in results["runs"]})
    s = summarise(results)
    names = results["task_names"]
    lines = ["# orthomerge experiment report", ""]
    if command:
        lines += ["Made by:", "", "```", command, "```", ""]
    train = cfg["train"]
    lines += [
        f"Model `{cfg['model']}`; LoRA r={train['rank']}, α={train['alpha']} on {', '.join(train['targets'])}; "
        f"lr {train['lr']}, {train['epochs']} epochs, batch {train['batch_size']}, max length {train['max_length']}; "
        f"arms {', '.join(arms)}; seeds {seeds}; OSRM statistics from {cfg['stats_samples']} training samples "
        f"per task. λ (and nothing else) is chosen per method on the validation split from "
        f"{cfg['lambdas']}; every number below is on the test split. Wall time {results['seconds']:.0f} s.", "",
        "| task | metric | train / val / test | source |", "|---|---|---|---|",
    ]
    lines += [f"| {t['name']} | {t['metric']} | {' / '.join(map(str, t['sizes']))} | {t['source']} |"
              for t in results["tasks"]]
    lines += ["", "## Single-task adapters (test)", "", "| arm | " + " | ".join(names) + " | mean |",
              "|---|" + "---|" * (len(names) + 1)]
    for arm in arms:
        per_seed = s["single"][arm]
        row = [mean_std([per_seed[sd][n] for sd in per_seed]) for n in names]
        row.append(mean_std([np.mean([per_seed[sd][n] for n in names]) for sd in per_seed]))
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    lines += ["", "## Merged: normalised test score (merged ÷ the task's own adapter, mean over tasks)", "",
              "`heads_only` is the base model with each task's trained head and no LoRA update: a merge that "
              "does not beat it adds nothing.", "",
              "| method | " + " | ".join(arms) + " | λ chosen (" + ", ".join(arms) + ") |",
              "|---|" + "---|" * (len(arms) + 1)]
    for method, cells in s["table"].items():
        row = [mean_std(cells[a]["norm"].values()) if a in cells else "" for a in arms]
        lams = ["/".join(f"{v:g}" for v in cells[a]["lambda"].values()) if a in cells else "" for a in arms]
        lines.append(f"| {method} | " + " | ".join(row) + " | " + ", ".join(lams) + " |")
    diffs = contrasts(s, arms)
    if diffs:
        lines += ["", "## Key contrasts (paired over seeds, normalised test score, 95% t-interval)", "",
                  "| method | contrast | difference |", "|---|---|---|"]
        lines += [f"| {m} | {a} − {b} | {_fmt_diff(d)} |" for m, a, b, d in diffs]
        lines += ["", *verdicts(diffs, s, arms, names)]
    lines += ["", "## Interference diagnostics (held-out validation inputs, base-model activations)", "",
              "`ΔW ratio`: mean off-diagonal ‖ΔW_j X_iᵀ‖ / ‖ΔW_i X_iᵀ‖ of the trained adapters. "
              "`A-side at init / trained`: mean off-diagonal sqrt(tr(A_j S_i A_jᵀ) / tr(A_j S_j A_jᵀ)), what OSRM "
              "minimises (B = 0 at init, so only the A side is defined there). `drift`: mean principal-angle "
              "cosine between A at init and after training (1 = A stayed in its subspace).", "",
              "| arm | ΔW ratio | A-side at init | A-side trained | drift cosine | relative change of A |",
              "|---|---|---|---|---|---|"]
    for arm in arms:
        runs = [r for r in results["runs"] if r["arm"] == arm]
        off = lambda m: np.asarray(m, dtype=float)[~np.eye(len(m), dtype=bool)].mean()  # noqa: E731
        drift = [d for r in runs for d in r["drift"].values() if d]
        lines.append(
            f"| {arm} | {mean_std([off(r['interference']) for r in runs])} | "
            f"{mean_std([off(r['input_energy_init']) for r in runs if r['input_energy_init'][0][0] is not None])} | "
            f"{mean_std([off(r['input_energy_trained']) for r in runs])} | "
            f"{mean_std([d['mean_cosine'] for d in drift])} | {mean_std([d['relative_change'] for d in drift])} |")
    lines += ["", "Plots: `lambda_curves.png` (validation normalised score vs λ), `per_task.png`, "
              "`interference.png`.", ""]
    return "\n".join(lines)


def verdicts(diffs, summary, arms, names) -> list[str]:
    """Plain sentences on where OSRM helped and where it did not, from the measured differences."""
    out = []
    for m, a, b, d in diffs:
        if (a, b) != ("osrm", "lora"):
            continue
        if d["n"] > 1 and d["low"] > 0:
            word = "helped (interval above 0)"
        elif d["n"] > 1 and d["high"] < 0:
            word = "hurt (interval below 0)"
        elif d["n"] > 1:
            word = "made no significant difference (interval contains 0)"
        else:
            word = "helped" if d["mean"] > 0 else "did not help"
        cells = summary["table"][m]
        seeds = sorted(set(cells["osrm"]["tasks"]) & set(cells["lora"]["tasks"]))
        worse = [n for n in names
                 if np.mean([cells["osrm"]["tasks"][s][n] - cells["lora"]["tasks"][s][n] for s in seeds]) < 0]
        tail = f"; worse than standard LoRA on {', '.join(worse)}" if worse else "; better or equal on every task"
        out.append(f"- {m}: OSRM {word}, {d['mean']:+.3f} normalised{tail}.")
    return out


def render_plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in results["runs"]))
    names = results["task_names"]
    paths = []

    methods = [m["method"] for m in results["runs"][0]["merges"] if len(m["val_curve"]) > 1]
    cols = min(4, max(1, len(methods)))
    rows = max(1, math.ceil(len(methods) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, method in zip(axes.flat, methods):
        for arm in arms:
            curves = [next(m for m in r["merges"] if m["method"] == method)["val_curve"]
                      for r in results["runs"] if r["arm"] == arm]
            lams = sorted(float(k) for k in curves[0])
            values = np.array([[c[str(k)] if str(k) in c else c[k] for k in lams] for c in curves])
            ax.errorbar(lams, values.mean(0), yerr=values.std(0) if len(values) > 1 else None, label=arm,
                        marker="o", capsize=3)
        ax.set_title(method)
        ax.set_xlabel("λ")
        ax.set_ylabel("normalised val score")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    paths.append(out / "lambda_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    s = summarise(results)
    best_method = "task_arithmetic" if "task_arithmetic" in s["table"] else next(iter(s["table"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names)), 3.5))
    width = 0.8 / (2 * len(arms))
    x = np.arange(len(names))
    for k, arm in enumerate(arms):
        single = s["single"][arm]
        merged = s["table"][best_method][arm]["tasks"]
        ax.bar(x + (2 * k) * width, [np.mean([single[sd][n] for sd in single]) for n in names], width,
               label=f"{arm} single")
        ax.bar(x + (2 * k + 1) * width, [np.mean([merged[sd][n] * single[sd][n] for sd in merged]) for n in names],
               width, label=f"{arm} {best_method}", hatch="//")
    ax.set_xticks(x + 0.4 - width / 2, names, rotation=20)
    ax.set_ylabel("test metric")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out / "per_task.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(arms), figsize=(3.6 * len(arms), 3.2), squeeze=False)
    for ax, arm in zip(axes.flat, arms):
        mats = np.array([r["interference"] for r in results["runs"] if r["arm"] == arm]).mean(0)
        image = ax.imshow(mats, cmap="magma", vmin=0)
        ax.set_title(f"{arm}: ‖ΔW_j X_i‖/‖ΔW_i X_i‖", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("adapter j")
        ax.set_ylabel("inputs of task i")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    paths.append(out / "interference.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(results_path: str | Path, command: str = "") -> Path:
    results_path = Path(results_path)
    try:
        results = json.loads(results_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise OrthomergeError(f"{results_path}: cannot read results ({err})") from None
    out = results_path.parent
    render_plots(results, out)
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(render_markdown(results, command))
    return out / "report.md"
