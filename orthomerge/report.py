"""``report.md`` and PNG plots from an experiment's ``results.json`` (pure rendering, no training).

Fields read beyond what every experiment writes (each table is left out when its fields are missing, so
older ``results.json`` files still render):

* ``runs[i]["merges"][k]["test_curve"]``: λ → normalised test mean over tasks, for the same λ grid as
  ``val_curve`` (the λ-robustness table; without it the table is computed from ``val_curve`` and says so).
* ``runs[i]["subset_merges"]``: the number-of-tasks curve, a list of ``{"tasks": [names], "method": str,
  "lambda": float, "test_normalised_mean": float}``, one per merged subset of ``study.task_subsets`` (the
  same subsets in every run), λ chosen on validation as for the full merge.
* The decision rule uses only fields every run has: ``single["validation"]`` and the task-arithmetic
  merge's ``val_curve`` at its chosen ``lambda``; an arm ``lora`` must be present.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import OrthomergeError
from .outputs import atomic_file
from .evaluate import off_diagonal_mean
from . import study

CONTRASTS = [("osrm", "lora"), ("osrm", "orthogonal"), ("orthogonal", "lora"), ("lora-unit", "lora"),
             ("osrm", "gaussian"), ("orthogonal", "gaussian"), ("gaussian", "lora")]
INIT_ARMS = {"lora", "osrm", "orthogonal", "lora-unit", "gaussian"}   # every other arm is an option on top
RECOMMENDED_AGAINST = ("lora", "gaussian", "orthogonal")   # the recommended arm's paired test contrasts


def mean_std(values) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean and standard deviation of per-seed differences a − b with the paired t-test's 95% confidence
    interval (:func:`scipy.stats.ttest_rel`; none for one seed)."""
    from scipy.stats import ttest_rel

    d = np.asarray(a) - np.asarray(b)
    n = len(d)
    low = high = float("nan")
    if n > 1:
        ci = ttest_rel(a, b).confidence_interval(0.95)
        low, high = float(ci.low), float(ci.high)
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    return {"mean": float(d.mean()), "sd": sd, "low": low, "high": high, "n": n}


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
    """(method, arm a, arm b, paired difference) for the key contrasts present in the run, and each extra
    arm against standard LoRA and against plain OSRM."""
    pairs = CONTRASTS + [(a, b) for a in arms if a not in INIT_ARMS for b in ("lora", "osrm")]
    out = []
    for method, cells in summary["table"].items():
        if method == "heads_only":
            continue
        for a, b in pairs:
            if a in arms and b in arms and a in cells and b in cells:
                out.append((method, a, b, _paired(cells, a, b)))
    return out


def _paired(cells: dict, a: str, b: str) -> dict:
    """Paired difference a − b over the seeds both arms ran, each seed's means over the tasks both define."""
    seeds = sorted(set(cells[a]["tasks"]) & set(cells[b]["tasks"]))
    means = [_common_means(cells[a]["tasks"][s], cells[b]["tasks"][s]) for s in seeds]
    return paired_difference([x for x, _ in means], [y for _, y in means])


def _common_means(x: dict, y: dict) -> tuple[float, float]:
    """Means of two arms' per-task normalised scores over the tasks both define, so a paired difference
    compares the same tasks (a task whose own adapter scored 0 has no normalised score)."""
    keys = [k for k in x if x[k] is not None and y.get(k) is not None and np.isfinite(x[k]) and np.isfinite(y[k])]
    return float(np.mean([x[k] for k in keys])), float(np.mean([y[k] for k in keys]))


def _own_grids(cfg: dict) -> str:
    grids = cfg.get("method_lambdas") or {}
    return "".join(f" ({m}: {g})" for m, g in grids.items())


def protocol_lines(cfg: dict, results: dict) -> list[str]:
    """Precision, where training departs from the official OSRM recipe, how β was chosen and what the post
    conversion kept: one paragraph (results that predate these fields read as the defaults they ran with)."""
    from dataclasses import fields

    from .config import TrainConfig, protocol_deviations

    known = {f.name for f in fields(TrainConfig)}
    train = TrainConfig(**{k: v for k, v in cfg["train"].items() if k in known})
    parts = [f"Base model precision: {cfg.get('dtype', 'auto')}.",
             "Departures from the official OSRM training recipe: " + "; ".join(protocol_deviations(train)) + "."]
    for arm, choice in (results.get("beta_choice") or {}).items():
        scores = ", ".join(f"β={float(b):g}: {v:.3f} (single {choice['validation_single'][b]:.3f})"
                           for b, v in choice["validation_merged"].items())
        parts.append(f"`{arm}`: β = {choice['chosen']:g} chosen on seed {choice['seed']}'s validation split "
                     f"(task-arithmetic normalised score, single-task mean; lora's single {choice['reference_single']:.3f}"
                     f"): {scores}.")
    kept = [v for r in results["runs"] for v in (r.get("post_retained_energy") or {}).values() if v is not None]
    if kept:
        parts.append(f"`post`: the trained adapters' ΔW projected onto the OSRM subspace kept {np.mean(kept):.3f} "
                     f"of their energy on average (min {min(kept):.3f}).")
    return [" ".join(parts), ""]


def render_markdown(results: dict) -> str:
    cfg = results["config"]
    arms = list(dict.fromkeys(r["arm"] for r in results["runs"]))
    seeds = sorted({r["seed"] for r in results["runs"]})
    s = summarise(results)
    names = results["task_names"]
    lines = ["# orthomerge experiment report", ""]
    if results.get("command"):
        lines += ["Made by:", "", "```", results["command"], "```", ""]
    train = cfg["train"]
    wall = f"Wall time {results['seconds']:.0f} s."
    if results.get("reused_runs"):
        wall = (f"Wall time {results['seconds']:.0f} s, with {results['reused_runs']} of {len(results['runs'])} "
                f"(seed, arm) runs reused from an earlier invocation's cache (not the cost of the whole run).")
    lines += [
        f"Model `{cfg['model']}`; LoRA r={train['rank']}, α={train['alpha']} on {', '.join(train['targets'])}; "
        f"lr {train['lr']}, {train['epochs']} epochs, batch {train['batch_size']}, max length {train['max_length']}; "
        f"arms {', '.join(arms)}; seeds {seeds}; OSRM statistics from {cfg['stats_samples']} training samples "
        f"per task. λ is chosen per method on the validation split from "
        f"{cfg['lambdas']}{_own_grids(cfg)} (and β of an arm with a β grid, below); every number below is on "
        f"the test split. {wall}", "",
        *protocol_lines(cfg, results),
        *([f"**Partial run: {len(results['runs'])} of {results['expected_runs']} (seed, arm) runs finished.**", ""]
          if len(results["runs"]) < results.get("expected_runs", len(results["runs"])) else []),
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
    failed = [f"{arm} seed {sd} {n}" for arm in arms for sd, scores in s["single"][arm].items()
              for n in names if not scores[n]]
    if failed:
        lines += ["", f"**Own adapter scored 0 on its test split** (training did not learn the task, e.g. F1 0 "
                  f"from predicting one class): {', '.join(failed)}. Normalised scores are undefined for those "
                  f"(÷ 0), so that run's normalised mean is over the other tasks."]
    lines += ["", "## Merged: normalised test score (merged ÷ the task's own adapter, mean over tasks)", "",
              *(["`heads_only` is the base model with each task's trained head and no LoRA update: a merge "
                 "that does not beat it adds nothing.", ""] if cfg.get("heads_only", True) else []),
              "| method | " + " | ".join(arms) + " | λ chosen (" + ", ".join(arms) + ") |",
              "|---|" + "---|" * (len(arms) + 1)]
    for method, cells in s["table"].items():
        row = [mean_std(cells[a]["norm"].values()) if a in cells else "" for a in arms]
        lams = ["/".join(f"{v:g}" for v in cells[a]["lambda"].values()) if a in cells else "" for a in arms]
        lines.append(f"| {method} | " + " | ".join(row) + " | " + ", ".join(lams) + " |")
    diffs = contrasts(s, arms)
    if diffs:
        methods = list(dict.fromkeys(m for m, *_ in diffs))
        lines += ["", "## Key contrasts (paired over seeds, normalised test score over the tasks both arms define, "
                  "95% t-interval)", "",
                  "| contrast | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        by_pair = defaultdict(list)
        for m, a, b, d in diffs:
            by_pair[f"{a} − {b}"].append(_fmt_diff(d))
        lines += [f"| {pair} | " + " | ".join(cells) + " |" for pair, cells in by_pair.items()]
        lines += ["", *verdicts(diffs, s, arms, names)]
    lines += ["", "## Interference diagnostics (held-out validation inputs)", "",
              "`ΔW ratio`: mean off-diagonal ‖ΔW_j X_iᵀ‖ / ‖ΔW_i X_iᵀ‖ of the trained adapters, with X_i from the "
              "base model's activations and (`on merged`) from the task-arithmetic merge's own activations at its "
              "chosen λ. `A energy`: tr(A_j S_i A_jᵀ) / (tr(A_j A_jᵀ)·tr(S_i)/n), the input energy through A_j "
              "relative to a random A of the same norm (1 = no selectivity), for other tasks' inputs (i ≠ j, what "
              "OSRM minimises) and the task's own (i = j), at init (B = 0, so only the A side is defined there) and "
              "after training. `drift`: mean "
              "principal-angle cosine between A at init and after training (1 = A stayed in its subspace).", "",
              "| arm | ΔW ratio | ΔW ratio on merged | A energy other / own, init | A energy other / own, trained "
              "| drift cosine | relative change of A |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        runs = [r for r in results["runs"] if r["arm"] == arm]
        drift = [d for r in runs for d in r["drift"].values() if d]
        merged = [off_diagonal_mean(r["interference_merged"]) for r in runs if r.get("interference_merged")]
        lines.append(
            f"| {arm} | {mean_std([off_diagonal_mean(r['interference']) for r in runs])} | {mean_std(merged)} | "
            f"{_other_own(runs, 'input_energy_init')} | {_other_own(runs, 'input_energy_trained')} | "
            f"{mean_std([d['mean_cosine'] for d in drift])} | {mean_std([d['relative_change'] for d in drift])} |")
    per_module = [r.get("interference_per_module") for r in results["runs"]]
    if all(per_module):
        modules = list(per_module[0])
        lines += ["", "Per layer (mean off-diagonal ΔW ratio, base-model activations):", "",
                  "| module | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        for m in modules:
            cells = [mean_std([r["interference_per_module"][m] for r in results["runs"] if r["arm"] == arm])
                     for arm in arms]
            lines.append(f"| {_short(m)} | " + " | ".join(cells) + " |")
    lines += study_section(diffs)
    lines += decision_section(results, s)
    lines += mde_section(diffs)
    lines += lambda_robustness_section(results)
    lines += ntasks_section(results)
    lines += safety_section(results)
    lines += ["", "Plots: `lambda_curves.png` (validation normalised score vs λ), `per_task.png`, "
              "`interference.png`" + (", `ntasks.png`" if ntasks_curve(results) else "")
              + (", `safety.png`" if results.get("safety") else "") + ".", ""]
    return "\n".join(lines)


def safety_section(results: dict) -> list[str]:
    """The safety check's tables when ``results["safety"]`` holds an :func:`orthomerge.safety.compare_safety`
    result (a causal-LM experiment puts it there); nothing otherwise."""
    if not results.get("safety"):
        return []
    from .safety import render_markdown as safety_markdown

    return ["", safety_markdown(results["safety"], heading="##").rstrip("\n")]


def _other_own(runs: list[dict], key: str) -> str:
    """``other / own`` means of an energy matrix (off-diagonal / diagonal) over seeds."""
    mats = [np.asarray(r[key], dtype=float) for r in runs if r[key] and r[key][0][0] is not None]
    if not mats:
        return "n/a"
    return f"{mean_std([off_diagonal_mean(m) for m in mats])} / {mean_std([np.diag(m).mean() for m in mats])}"


def _short(module: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` → ``layer 3 query``."""
    parts = module.split(".")
    layer = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p in ("layer", "layers")), "?")
    return f"layer {layer} {parts[-1]}"


def study_section(diffs: list) -> list[str]:
    """How much of OSRM's gain over a baseline is scale (orthogonal − baseline) and how much subspace
    (osrm − orthogonal), against standard LoRA and, when it ran, the paper's baseline ``gaussian``."""
    diff = {(m, a, b): d["mean"] for m, a, b, d in diffs}
    lines = []
    for base in ("lora", "gaussian"):
        parts = [("osrm", base), ("orthogonal", base), ("osrm", "orthogonal")]
        rows = [f"| {method} | " + " | ".join(f"{diff[method, a, b]:+.3f}" for a, b in parts) + " |"
                for method in dict.fromkeys(m for m, *_ in diffs) if all((method, a, b) in diff for a, b in parts)]
        if rows:
            title = "Subspace or scale?" if base == "lora" else "Subspace or scale, against the paper's baseline?"
            lines += ["", f"## {title} (normalised test score, the paired contrasts' means)", "",
                      f"| method | osrm − {base} | = scale: orthogonal − {base} | + subspace: osrm − orthogonal |",
                      "|---|---|---|---|", *rows]
    return lines


def mde_section(diffs: list) -> list[str]:
    """The minimum detectable difference at 80 % power (two-sided α = 0.05) of every paired contrast, from
    its number of seeds and the standard deviation of its per-seed differences (``study``)."""
    rows = [(m, a, b, d) for m, a, b, d in diffs if d["n"] > 1]
    if not rows:
        return []
    lines = ["", "## Minimum detectable difference (80 % power, two-sided α = 0.05, paired over seeds)", "",
             "The true difference the paired t-test would detect 4 times in 5 with this many seeds, given the "
             "spread of the observed per-seed differences (exact noncentral t). An observed difference well "
             "below it is not evidence of no effect.", "",
             "| contrast | method | seeds | sd of differences | observed | minimum detectable |",
             "|---|---|---|---|---|---|"]
    for m, a, b, d in rows:
        mde = study.minimum_detectable_difference(d["n"], d["sd"])
        lines.append(f"| {a} − {b} | {m} | {d['n']} | {d['sd']:.3f} | {d['mean']:+.3f} | {mde:.3f} |")
    return lines


def lambda_robustness_section(results: dict) -> list[str]:
    """Per method and arm, the normalised score's minimum over λ ∈ [0.3, 0.8] and its mean over the whole
    grid (mean ± std over seeds): from ``test_curve`` where every merge has one, else ``val_curve``."""
    merges = [m for r in results["runs"] for m in r["merges"] if len(m.get("val_curve") or {}) > 1]
    if not merges:
        return []
    key = "test_curve" if all(m.get("test_curve") for m in merges) else "val_curve"
    arms = list(dict.fromkeys(r["arm"] for r in results["runs"]))
    table = defaultdict(lambda: defaultdict(list))
    for run in results["runs"]:
        for merge in run["merges"]:
            if len(merge.get("val_curve") or {}) > 1:
                table[merge["method"]][run["arm"]].append(study.lambda_robustness(merge[key]))
    low, high = study.LAMBDA_WINDOW
    split = "test" if key == "test_curve" else "validation; test is scored at the chosen λ only"
    grids = {m["method"]: sorted(float(k) for k in m[key]) for m in merges}
    lines = ["", f"## Robustness to λ ({split})", "",
             f"Each cell: the normalised score's minimum over λ ∈ [{low:g}, {high:g}] / its mean over the "
             "method's whole grid (" + "; ".join(f"{m}: {', '.join(f'{x:g}' for x in g)}" for m, g in grids.items())
             + ").", "",
             "| method | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for method, cells in table.items():
        row = [f"{mean_std([x['window_min'] for x in cells[a]])} / {mean_std([x['mean'] for x in cells[a]])}"
               if a in cells else "" for a in arms]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def ntasks_curve(results: dict) -> dict:
    """method → arm → N → per-seed means over that run's N-task subsets (empty without ``subset_merges``),
    ending at N = all tasks with the run's full merge of that method."""
    curve = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    everything = len(results["task_names"])
    for run in results["runs"]:
        by_size = defaultdict(list)
        for merge in run.get("subset_merges") or []:
            by_size[merge["method"], len(merge["tasks"])].append(merge["test_normalised_mean"])
        for merge in run["merges"] if by_size else []:
            if any(method == merge["method"] for method, _ in by_size):
                by_size[merge["method"], everything].append(merge["test_normalised_mean"])
        for (method, size), values in by_size.items():
            curve[method][run["arm"]][size].append(float(np.nanmean(values)))
    return curve


def ntasks_section(results: dict) -> list[str]:
    """The normalised test score against the number of merged tasks N, per method and arm."""
    curve = ntasks_curve(results)
    if not curve:
        return []
    arms = list(dict.fromkeys(r["arm"] for r in results["runs"]))
    sizes = sorted({n for cells in curve.values() for by_n in cells.values() for n in by_n})
    lines = ["", "## Number of merged tasks (normalised test score; mean over the subsets, ± std over seeds)", "",
             "Every arm merges the same task subsets (`study.task_subsets`, fixed seed); the last column is the "
             "full merge above (its λ from the method's own grid); plot `ntasks.png`.", "",
             "| method | arm | " + " | ".join(f"N = {n}" for n in sizes) + " |", "|---|---|" + "---|" * len(sizes)]
    for method, cells in curve.items():
        for arm in arms:
            if arm in cells:
                lines.append(f"| {method} | {arm} | " + " | ".join(mean_std(cells[arm].get(n, [])) for n in sizes)
                             + " |")
    return lines


def decision(results: dict) -> dict | None:
    """The study's decision rule (``study.recommend_variant``) on the validation split: per arm, the means
    over seeds of the single-task validation mean and of the task-arithmetic validation normalised score at
    its chosen λ. None when there is no ``lora`` arm or no task-arithmetic merge."""
    merged, single = defaultdict(list), defaultdict(list)
    for run in results["runs"]:
        ta = next((m for m in run["merges"] if m["method"] == study.DECISION_METHOD and m["val_curve"]), None)
        if ta is None:
            continue
        merged[run["arm"]].append(study.validation_choice(ta))
        single[run["arm"]].append(float(np.mean(list(run["single"]["validation"].values()))))
    if "lora" not in merged:
        return None
    merged = {a: float(np.mean(v)) for a, v in merged.items()}
    single = {a: float(np.mean(v)) for a, v in single.items()}
    return {**study.recommend_variant(merged, single), "validation_merged": merged, "validation_single": single}


def decision_section(results: dict, summary: dict) -> list[str]:
    """The decision rule's table and outcome, and the recommended arm's paired test intervals against
    lora, gaussian and orthogonal for every method."""
    rule = decision(results)
    if rule is None:
        return []
    tol = rule["tolerance"]
    lines = ["", "## Decision rule (fixed before the run; validation split only)", "",
             f"Recommended: the arm with the best validation normalised score of {study.DECISION_METHOD} among "
             f"the arms whose single-task validation mean is at least standard LoRA's − {tol:g} (1 point).", "",
             "| arm | single-task (val) | Δ vs lora | task arithmetic (val) | eligible |", "|---|---|---|---|---|"]
    ref = rule["validation_single"]["lora"]
    for arm in sorted(rule["validation_merged"], key=lambda a: -rule["validation_merged"][a]):
        single = rule["validation_single"][arm]
        lines.append(f"| {arm} | {single:.3f} | {single - ref:+.3f} | {rule['validation_merged'][arm]:.3f} | "
                     f"{'yes' if arm in rule['eligible'] else 'no'} |")
    best = rule["recommended"]
    lines += ["", f"Recommended: **{best}**" + (" (no variant beats standard LoRA under the rule)."
                                                if best == "lora" else ".")]
    against = [b for b in RECOMMENDED_AGAINST if b != best]
    rows = []
    for method, cells in summary["table"].items():
        if method == "heads_only" or best not in cells:
            continue
        parts = [_fmt_diff(_paired(cells, best, b)) if b in cells else "n/a" for b in against]
        rows.append(f"| {method} | {mean_std(cells[best]['norm'].values())} | " + " | ".join(parts) + " |")
    if rows:
        lines += ["", f"{best} on test (normalised; paired over seeds, 95 % t-interval):", "",
                  "| method | score | " + " | ".join(f"− {b}" for b in against) + " |",
                  "|---|---|" + "---|" * len(against), *rows]
    return lines


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

    kinds = [("interference", "base activations")]
    if all(r.get("interference_merged") for r in results["runs"]):
        kinds.append(("interference_merged", "merged-model activations"))
    fig, axes = plt.subplots(len(kinds), len(arms), figsize=(3.6 * len(arms), 3.3 * len(kinds)), squeeze=False)
    for row, (key, label) in zip(axes, kinds):
        for ax, arm in zip(row, arms):
            mats = np.array([r[key] for r in results["runs"] if r["arm"] == arm]).mean(0)
            image = ax.imshow(mats, cmap="magma", vmin=0)
            ax.set_title(f"{arm}, {label}", fontsize=8)
            ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_xlabel("adapter j", fontsize=7)
            ax.set_ylabel("inputs of task i", fontsize=7)
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle("interference ‖ΔW_j X_i‖ / ‖ΔW_i X_i‖", fontsize=9)
    fig.tight_layout()
    paths.append(out / "interference.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if ntasks_curve(results):
        paths.append(render_ntasks_plot(results, out / "ntasks.png"))
    if results.get("safety"):
        from .safety import render_plot as safety_plot

        paths.append(safety_plot(results["safety"], out / "safety.png"))
    return paths


def render_ntasks_plot(results: dict, path: Path) -> Path:
    """``ntasks.png``: normalised test score against the number of merged tasks, one line per arm (error bars:
    std over seeds), one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = ntasks_curve(results)
    fig, axes = plt.subplots(1, len(curve), figsize=(4.2 * len(curve), 3.3), squeeze=False)
    for ax, (method, cells) in zip(axes.flat, curve.items()):
        for arm, by_n in cells.items():
            sizes = sorted(by_n)
            means = [np.mean(by_n[n]) for n in sizes]
            spread = [np.std(by_n[n], ddof=1) if len(by_n[n]) > 1 else 0.0 for n in sizes]
            ax.errorbar(sizes, means, yerr=spread, marker="o", capsize=3, label=arm)
        ax.set_title(method)
        ax.set_xlabel("number of merged tasks N")
        ax.set_ylabel("normalised test score")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results_path: str | Path) -> Path:
    results_path = Path(results_path)
    try:
        results = json.loads(results_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise OrthomergeError(f"{results_path}: cannot read results ({err})") from None
    out = results_path.parent
    render_plots(results, out)
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(render_markdown(results))
    return out / "report.md"
