"""The OSRM study's statistics (orthomerge.study) against direct computations, and the study's report tables."""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
from scipy import stats

from orthomerge.errors import OrthomergeError
from orthomerge.study import (choose_beta, lambda_robustness, minimum_detectable_difference, recommend_variant,
                              task_subsets)

TASKS = ["sentiment", "trec", "sms_spam", "tweet_sentiment", "ag_news", "emotion", "qnli", "rte"]


@pytest.mark.parametrize("n, sd", [(5, 0.04), (8, 1.0), (3, 0.1)])
def test_mde_has_80_percent_power_by_simulation(n, sd):
    """The paired t-test's rejection rate at the returned δ, simulated, is 0.80 (and its noncentral-t
    power, computed from the distribution's cdf, is 0.80 to solver precision)."""
    delta = minimum_detectable_difference(n, sd)
    df, crit = n - 1, stats.t.ppf(0.975, n - 1)
    nc = delta * math.sqrt(n) / sd
    assert 1 - (stats.nct.cdf(crit, df, nc) - stats.nct.cdf(-crit, df, nc)) == pytest.approx(0.8, abs=1e-9)
    rng = np.random.default_rng(0)
    diffs = rng.normal(delta, sd, size=(40000, n))
    rate = (stats.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05).mean()
    assert rate == pytest.approx(0.8, abs=0.01)   # 4 standard errors of a 40000-draw proportion


def test_mde_against_the_normal_approximation():
    """(t_{1−α/2} + t_{0.8})·sd/√n understates δ for few pairs and agrees for many."""
    def approx(n, sd):
        return (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
    assert minimum_detectable_difference(5, 1.0) > approx(5, 1.0)
    assert minimum_detectable_difference(400, 1.0) == pytest.approx(approx(400, 1.0), rel=5e-3)
    assert minimum_detectable_difference(6, 2.0) == pytest.approx(2 * minimum_detectable_difference(6, 1.0))
    assert math.isnan(minimum_detectable_difference(1, 1.0)) and minimum_detectable_difference(5, 0.0) == 0.0


def test_task_subsets_are_reproducible_and_the_same_for_every_arm():
    subsets = task_subsets(TASKS, (2, 4, 6, 8), seed=0, per_size=3)
    assert task_subsets(TASKS, (2, 4, 6, 8), seed=0, per_size=3) == subsets
    assert task_subsets(list(reversed(TASKS)), (8, 6, 4, 2), seed=0, per_size=3)[4] == [
        tuple(sorted(s, key=list(reversed(TASKS)).index)) for s in subsets[4]]   # order of names: irrelevant
    assert task_subsets(TASKS, (2,), seed=0, per_size=3)[2] == subsets[2]     # sizes drawn independently
    assert task_subsets(TASKS, (2, 4, 6, 8), seed=1, per_size=3) != subsets
    assert sorted(subsets) == [2, 4, 6, 8] and subsets[8] == [tuple(TASKS)]  # one subset of all 8
    for size, drawn in subsets.items():
        assert len(set(drawn)) == len(drawn) and all(len(s) == size for s in drawn)
        assert all(list(s) == [t for t in TASKS if t in s] for s in drawn)   # in the task list's order
    few = task_subsets(TASKS[:3], (2, 4), per_size=5)   # fewer combinations than asked: all; N > 3 left out
    assert list(few) == [2] and set(few[2]) == set(combinations(TASKS[:3], 2))
    with pytest.raises(OrthomergeError, match="at least 2"):
        task_subsets(TASKS, (1, 2))


def test_task_subsets_cover_the_combinations_uniformly():
    """Over many seeds every pair of 4 tasks is drawn about equally often (no built-in preference)."""
    counts = {}
    for seed in range(3000):
        for s in task_subsets(TASKS[:4], (2,), seed=seed, per_size=1)[2]:
            counts[s] = counts.get(s, 0) + 1
    assert len(counts) == 6 and max(counts.values()) / min(counts.values()) < 1.25


def test_lambda_robustness_minimum_over_window_and_mean_over_grid():
    curve = {"0.1": 0.5, "0.2": 0.6, "0.3": 0.8, "0.5": 0.9, "0.8": 0.7, "0.9": 0.4, "1.0": 0.2}
    got = lambda_robustness(curve)
    assert got["window_min"] == 0.7 and got["mean"] == pytest.approx(np.mean(list(curve.values())))
    assert math.isnan(lambda_robustness({1.0: 0.9})["window_min"])


def test_decision_rule_on_synthetic_inputs():
    merged = {"lora": 0.80, "osrm": 0.86, "osrm-freezeA": 0.99, "osrm-beta": 0.90, "orthogonal": 0.85}
    single = {"lora": 0.83, "osrm": 0.825, "osrm-freezeA": 0.40, "osrm-beta": 0.815, "orthogonal": 0.84}
    got = recommend_variant(merged, single)
    assert got["recommended"] == "osrm"                        # osrm-beta is 1.5 points below LoRA: out
    assert set(got["eligible"]) == {"lora", "osrm", "orthogonal"}
    assert recommend_variant({**merged, "osrm": 0.70}, single)["recommended"] == "orthogonal"
    assert recommend_variant({"lora": 0.9, "osrm": 0.8}, {"lora": 0.8, "osrm": 0.8})["recommended"] == "lora"
    assert recommend_variant({"lora": 0.8, "osrm": 0.8}, {"lora": 0.8, "osrm": 0.8})["recommended"] == "lora"
    with pytest.raises(OrthomergeError, match="reference arm"):
        recommend_variant({"osrm": 0.8}, {"osrm": 0.8})


def test_beta_choice_on_validation():
    merged = {0.01: 0.85, 0.1: 0.92, 1.0: 0.97}
    single = {0.01: 0.83, 0.1: 0.825, 1.0: 0.70}
    assert choose_beta(merged, single, reference_single=0.83) == 0.1    # β = 1 starves the task
    assert choose_beta({0.1: 0.9, 0.01: 0.9}, {0.1: 0.8, 0.01: 0.8}, 0.8) == 0.01   # tie: the smaller β
    assert choose_beta(merged, {0.01: 0.5, 0.1: 0.6, 1.0: 0.4}, 0.83) == 0.1       # none eligible: least starved


# ------------------------------------------------------------------ report tables on a synthetic results dict

NAMES = ["a", "b", "c", "d"]
LAMBDAS = [0.1, 0.3, 0.5, 0.8, 1.0]
# arm → (single-task validation mean, task-arithmetic validation score at the best λ, test normalised score)
ARMS = {"lora": (0.80, 0.85, 0.84), "gaussian": (0.79, 0.83, 0.82), "orthogonal": (0.80, 0.86, 0.85),
        "osrm": (0.80, 0.87, 0.86), "osrm-beta": (0.78, 0.95, 0.94), "osrm-selective": (0.80, 0.90, 0.89)}


def synthetic_results(seeds=(0, 1, 2, 3, 4), study_fields=True) -> dict:
    rng = np.random.default_rng(0)
    runs = []
    for arm, (single, val_best, test) in ARMS.items():
        for seed in seeds:
            noise = rng.normal(0, 0.01)
            single_scores = {n: single + noise for n in NAMES}
            val_curve = {str(lam): val_best + noise - 0.2 * (lam - 0.8) ** 2 for lam in LAMBDAS}
            test_curve = {str(lam): test + noise - 0.3 * (lam - 0.8) ** 2 for lam in LAMBDAS}
            norm = {n: test + noise for n in NAMES}
            merges = [
                {"method": "heads_only", "lambda": 0.0, "val_curve": {}, "test": {}, "test_normalised": norm,
                 "test_normalised_mean": test - 0.3, "test_mean": 0.5},
                {"method": "task_arithmetic", "lambda": 0.8, "val_curve": val_curve, "test": {},
                 "test_normalised": norm, "test_normalised_mean": test + noise, "test_mean": 0.7,
                 **({"test_curve": test_curve} if study_fields else {})},
            ]
            run = {"arm": arm, "seed": seed, "single": {"validation": single_scores, "test": single_scores},
                   "merges": merges, "interference": np.eye(4).tolist(), "interference_merged": None,
                   "input_energy_init": [[None] * 4] * 4, "input_energy_trained": np.ones((4, 4)).tolist(),
                   "drift": {n: None for n in NAMES}}
            if study_fields:
                run["subset_merges"] = [
                    {"tasks": list(s), "method": "task_arithmetic", "lambda": 0.8,
                     "test_normalised_mean": test + noise + 0.02 * (4 - size)}
                    for size, subsets in task_subsets(NAMES, (2, 4), seed=0).items() for s in subsets]
            runs.append(run)
    return {"config": {"model": "tiny", "stats_samples": 10, "lambdas": LAMBDAS,
                       "train": {"rank": 8, "alpha": 16, "targets": ["query"], "lr": 1e-3, "epochs": 1,
                                 "batch_size": 8, "max_length": 32}},
            "tasks": [{"name": n, "metric": "accuracy", "sizes": [10, 10, 10], "source": "test"} for n in NAMES],
            "task_names": NAMES, "runs": runs, "seconds": 1.0, "expected_runs": len(runs)}


def test_report_renders_the_study_tables(tmp_path):
    from orthomerge.report import contrasts, decision, render_markdown, render_plots, summarise

    results = synthetic_results()
    text = render_markdown(results)
    rule = decision(results)
    assert rule["recommended"] == "osrm-selective"           # osrm-beta: 2 points below LoRA, not eligible
    assert "osrm-beta" not in rule["eligible"] and "Recommended: **osrm-selective**" in text
    assert "osrm-selective on test" in text and "− gaussian" in text and "− orthogonal" in text
    # the MDE column equals a direct computation from the per-seed differences
    summary = summarise(results)
    arms = list(ARMS)
    d = next(d for m, a, b, d in contrasts(summary, arms) if (a, b) == ("osrm", "gaussian"))
    seeds = sorted(summary["table"]["task_arithmetic"]["osrm"]["norm"])
    diffs = [np.mean(list(summary["table"]["task_arithmetic"][arm]["tasks"][s].values())) for s in seeds
             for arm in ("osrm",)]
    diffs = np.subtract(diffs, [np.mean(list(summary["table"]["task_arithmetic"]["gaussian"]["tasks"][s].values()))
                                for s in seeds])
    mde = minimum_detectable_difference(len(seeds), float(np.std(diffs, ddof=1)))
    row = next(line for line in text.splitlines() if line.startswith("| osrm − gaussian | task_arithmetic | 5 |"))
    assert float(row.strip("| ").split(" | ")[-1]) == pytest.approx(mde, abs=5e-4) and d["n"] == 5
    assert "Subspace or scale, against the paper's baseline?" in text
    # λ robustness from the test curves: min over [0.3, 0.8] at λ = 0.3
    assert "## Robustness to λ (test)" in text
    lora = [lambda_robustness(r["merges"][1]["test_curve"]) for r in results["runs"] if r["arm"] == "lora"]
    cell = next(line for line in text.splitlines() if line.startswith("| task_arithmetic |") and " / " in line)
    assert cell.split(" | ")[1].startswith(f"{np.mean([x['window_min'] for x in lora]):.3f}")
    assert "## Number of merged tasks" in text and "N = 2 | N = 4" in text
    # its last column, N = every task, is the full merge of the same method
    full = np.mean([m["test_normalised_mean"] for r in results["runs"] if r["arm"] == "lora"
                    for m in r["merges"] if m["method"] == "task_arithmetic"])
    row = next(line for line in text.split("## Number of merged tasks")[1].splitlines()
               if line.startswith("| task_arithmetic | lora |"))
    assert f"N = {len(results['task_names'])} |" in text and row.split(" | ")[-1].startswith(f"{full:.3f}")
    paths = render_plots(results, tmp_path)
    assert (tmp_path / "ntasks.png") in paths and (tmp_path / "ntasks.png").stat().st_size > 0


def test_old_results_render_without_the_study_fields(tmp_path):
    from orthomerge.report import render_markdown, render_plots

    results = synthetic_results(seeds=(0,), study_fields=False)
    text = render_markdown(results)
    assert "Number of merged tasks" not in text and "Minimum detectable" not in text   # one seed: no MDE
    assert "Robustness to λ (validation" in text
    assert "Decision rule" in text
    render_plots(results, tmp_path)
    assert not (tmp_path / "ntasks.png").exists()
    del results["runs"][0]["merges"][1]   # no task arithmetic for lora: no decision table
    results["runs"] = [r for r in results["runs"] if r["arm"] == "lora"]
    assert "Decision rule" not in render_markdown(results)
