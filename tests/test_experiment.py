"""The end-to-end experiment on a tiny model and tiny user tasks: outputs, caching, evaluation oracles."""
from __future__ import annotations

import json
import pytest
import numpy as np
import torch

from conftest import WORDS
from orthomerge.adapters import load_adapter
from orthomerge.cli import main as cli
from orthomerge.evaluate import TaskEvaluator, adapter_deltas, predict
from orthomerge.models import load_model, load_tokenizer
from orthomerge.tasks import compute_metric, load_tasks
from orthomerge.train import TrainConfig
from peft_oracle import merged_state_dict

TOPICS = {
    "mood": (["great fun movie", "love the music", "good show"], ["awful boring plot", "bad actor", "hate it"]),
    "spam": (["win a free prize", "call now for money", "reply stop text"], ["the team game", "who is the star",
                                                                           "a city year"]),
    "kind": (["what city", "who is the actor", "how many year"], ["the film", "the phone", "music show"]),
}


@pytest.fixture(scope="module")
def tasks_yaml(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    specs = []
    for name, (pos, neg) in TOPICS.items():
        rows = [(f"{t} {w}", lab) for lab, texts in ((1, pos), (0, neg)) for t in texts for w in WORDS[:10]]
        for split, part in (("train", rows[0::2]), ("validation", rows[1::4]), ("test", rows[3::4])):
            (root / f"{name}.{split}.csv").write_text(
                "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in part))
        specs.append(f"- name: {name}\n  train: {name}.train.csv\n  validation: {name}.validation.csv\n"
                     f"  test: {name}.test.csv\n  labels: ['0', '1']\n  metric: accuracy\n")
    path = root / "tasks.yaml"
    path.write_text("".join(specs))
    return str(path)


def test_experiment_writes_every_output_and_reuses_cache(tiny_bert, tasks_yaml, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["experiment", "--model", tiny_bert, "--tasks", tasks_yaml, "--out", str(out), "--quiet",
            "--lambdas", "0.5,1", "--epochs", "2", "--lr", "0.02", "--rank", "4", "--train-size", "60"]
    assert cli(args + ["--methods", "task_arithmetic,ties,regmean,emr"]) == 0
    for name in ("results.json", "report.md", "lambda_curves.png", "per_task.png", "interference.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert {r["arm"] for r in results["runs"]} == {"lora", "osrm"}
    methods = [m["method"] for m in results["runs"][0]["merges"]]
    assert methods == ["heads_only", "task_arithmetic", "ties", "regmean", "emr"]
    report = (out / "report.md").read_text()
    assert "osrm − lora" in report and "task_arithmetic" in report
    assert "orthomerge " + " ".join(args[:3]) in report   # how it was made, kept for re-rendering
    for run in results["runs"]:
        for merge in run["merges"]:
            if merge["val_curve"]:
                best = max(merge["val_curve"].values())
                assert merge["val_curve"][str(merge["lambda"])] == best  # λ chosen on validation
    from orthomerge.report import render_markdown

    assert "scored 0" not in report
    failed = json.loads(json.dumps(results))
    task, run = failed["task_names"][0], failed["runs"][0]
    run["single"]["test"][task] = 0.0   # an own adapter that learned nothing is named in the report
    assert f"{run['arm']} seed {run['seed']} {task}" in render_markdown(failed)
    control = json.loads(json.dumps(results))   # a copy of LoRA as the orthogonal control: no scale effect
    control["runs"] += [{**r, "arm": "orthogonal"} for r in control["runs"] if r["arm"] == "lora"]
    study = render_markdown(control)
    ta = next(line for line in study.split("## Subspace or scale?")[1].splitlines() if "task_arithmetic" in line)
    osrm_lora, scale, subspace = (float(x) for x in ta.strip("| ").split(" | ")[1:])
    assert scale == 0.0 and subspace == osrm_lora

    import orthomerge.experiment as experiment

    def no_training(*args, **kwargs):
        raise AssertionError("cached adapters must be reused")

    monkeypatch.setattr(experiment, "train_adapter", no_training)
    assert cli(args + ["--methods", "task_arithmetic"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["reused_runs"] == 0   # other methods: adapters reused, evaluations redone
    assert cli(args + ["--methods", "task_arithmetic"]) == 0
    third = json.loads((out / "results.json").read_text())
    assert third["reused_runs"] == len(third["runs"]) and "reused from an earlier" in (out / "report.md").read_text()
    assert [r["single"] for r in again["runs"]] == [r["single"] for r in results["runs"]]
    monkeypatch.undo()   # other training settings: the cached adapters are retrained and replaced
    assert cli(args[:-8] + ["--epochs", "1", "--lr", "0.01", "--rank", "4", "--train-size", "60",
                            "--methods", "task_arithmetic"]) == 0
    for folder in (out / "adapters" / "seed0").glob("*/*"):
        assert json.loads((folder / "orthomerge.json").read_text())["config"]["lr"] == 0.01, folder
    mine = out / "adapters" / "seed0" / "lora" / results["task_names"][0]   # not orthomerge's: refused
    (mine / "orthomerge.json").unlink()
    (mine / "notes.txt").write_text("mine")
    assert cli(args + ["--methods", "task_arithmetic"]) != 0
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "adapter_model.safetensors").exists()


def test_evaluator_equals_dense_model_and_plain_peft(tiny_bert, tasks_yaml, tmp_path):
    from peft import PeftModel

    from orthomerge.merge import merge_adapters
    from orthomerge.train import train_adapter

    tasks = load_tasks([tasks_yaml], train_size=40, val_size=None, test_size=None)
    adapters = [train_adapter(tiny_bert, t, TrainConfig(rank=4, epochs=1, batch_size=8), progress=False)
                for t in tasks]
    for a, t in zip(adapters, tasks):
        a.path = tmp_path / t.name
    merged = merge_adapters(adapters, method="task_arithmetic", scale=0.7)
    merged.save(tmp_path / "merged")
    evaluator = TaskEvaluator(tiny_bert, tasks, max_length=64)
    dense_base = load_model(tiny_bert, num_labels=2).state_dict()
    tok = load_tokenizer(tiny_bert)
    for task in tasks:
        on_disk = load_adapter(tmp_path / "merged" / "tasks" / task.name)
        ours = evaluator.score(task.name, adapter_deltas(on_disk), on_disk.heads, "test")
        dense = load_model(tiny_bert, num_labels=2)
        dense.load_state_dict(merged_state_dict(load_model(tiny_bert, num_labels=2), on_disk))
        assert ours == compute_metric(task.metric, predict(dense, tok, task.test), task.test.labels)
        peft = PeftModel.from_pretrained(load_model(tiny_bert, num_labels=2), tmp_path / "merged" / "tasks" / task.name)
        batch = tok(task.test.texts, padding=True, return_tensors="pt")
        with evaluator.patched(task.name, adapter_deltas(on_disk), on_disk.heads) as model, torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, peft.eval()(**batch).logits, rtol=1e-4, atol=1e-5)
        for name, module in evaluator.models[task.name].named_modules():   # back at W₀ after every use
            if name in on_disk.modules:
                torch.testing.assert_close(module.weight, dense_base[f"{name}.weight"], rtol=0, atol=0)


def test_head_of_the_wrong_size_is_a_clear_error(tiny_bert, tasks_yaml, tmp_path, capsys):
    from orthomerge.adapters import from_peft_model, new_peft_model, save_adapter

    three = from_peft_model(new_peft_model(load_model(tiny_bert, num_labels=3), ["query"], rank=2))
    save_adapter(three, tmp_path / "three")
    assert cli(["eval", "--model", tiny_bert, "--tasks", tasks_yaml, "--adapter", str(tmp_path / "three"),
                "--task", "mood", "--train-size", "10", "--quiet", "--out", str(tmp_path / "m.json")]) == 2
    assert "head" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_paired_interval_equals_scipy_paired_t_test():
    """The report's key-contrast interval is the paired t-test's 95% confidence interval."""
    from scipy.stats import ttest_rel

    from orthomerge.report import paired_difference

    a, b = [0.91, 0.87, 0.95, 0.90], [0.88, 0.86, 0.89, 0.91]
    got = paired_difference(a, b)
    ci = ttest_rel(a, b).confidence_interval(0.95)
    assert got["n"] == 4 and np.isclose(got["mean"], np.mean(np.subtract(a, b)))
    assert np.isclose(got["low"], ci.low) and np.isclose(got["high"], ci.high)
    one = paired_difference([0.9], [0.8])
    assert np.isclose(one["mean"], 0.1) and np.isnan(one["low"]) and np.isnan(one["high"])


def test_contrasts_compare_the_same_tasks():
    """A task without a normalised score in one arm (its own adapter scored 0) is left out of both sides."""
    from orthomerge.report import contrasts

    nan = float("nan")
    tasks = {"osrm": {0: {"a": 0.9, "b": 0.7}, 1: {"a": 0.8, "b": 0.6}},
             "lora": {0: {"a": 0.8, "b": nan}, 1: {"a": 0.7, "b": 0.7}}}
    tasks["osrm-freezeA"] = tasks["osrm"]
    summary = {"table": {m: {arm: {"tasks": t} for arm, t in tasks.items()} for m in ("task_arithmetic", "ties")}}
    diffs = {(m, a, b): d for m, a, b, d in contrasts(summary, ["lora", "osrm", "osrm-freezeA"])}
    pairs = [("osrm", "lora"), ("osrm-freezeA", "lora"), ("osrm-freezeA", "osrm")]   # extra arms vs both
    assert set(diffs) == {(m, a, b) for m in ("task_arithmetic", "ties") for a, b in pairs}
    diff = diffs["ties", "osrm", "lora"]
    assert diff["n"] == 2 and np.isclose(diff["mean"], np.mean([0.9 - 0.8, 0.7 - 0.7]))   # seed 0: task a only
    assert diffs["ties", "osrm-freezeA", "osrm"]["mean"] == 0.0


def test_study_arms_beta_grid_post_and_task_subsets(tiny_bert, tasks_yaml, tmp_path):
    """The study's machinery on a tiny model: β is chosen on the first seed's validation by the rule (its
    grid runs recorded, the chosen β's adapters reused); the post arm converts lora's adapters; every arm
    merges the same task subsets; the compensated frozen-A arm scales A; per-method λ grids apply."""
    from orthomerge import study
    from orthomerge.experiment import Experiment, ExperimentConfig

    config = ExperimentConfig(
        tasks=tasks_yaml, model=tiny_bert, inits=["lora", "osrm"], seeds=[0, 1], methods=["task_arithmetic", "ties"],
        lambdas=[0.5, 1.0], method_lambdas={"ties": [1.0]}, train_size=24, val_size=None, test_size=None,
        stats_samples=8, train=TrainConfig(rank=2, epochs=1, batch_size=8), beta_grid=[0.01, 1.0],
        arms={"osrm-beta": {"init": "osrm", "beta": "grid"}, "freeze-comp": {"init": "osrm", "freeze": "A",
                                                                            "compensate": True},
              "post": {"post": "lora"}},
        ntasks=[2], ntasks_subsets=2, heads_only=False)
    results = Experiment(config, tmp_path / "run", progress=False).run()
    runs = {(r["arm"], r["seed"]): r for r in results["runs"]}
    assert sorted(runs) == sorted((a, s) for a in ("lora", "osrm", "osrm-beta", "freeze-comp", "post") for s in (0, 1))
    choice = results["beta_choice"]["osrm-beta"]
    assert choice["grid"] == [0.01, 1.0] and choice["seed"] == 0
    expected = study.choose_beta({float(k): v for k, v in choice["validation_merged"].items()},
                                 {float(k): v for k, v in choice["validation_single"].items()},
                                 choice["reference_single"])
    assert choice["chosen"] == expected
    assert all(r["train_config"]["beta"] == expected for (a, _), r in runs.items() if a == "osrm-beta")
    lora0 = runs["lora", 0]
    assert choice["reference_single"] == pytest.approx(np.mean(list(lora0["single"]["validation"].values())))
    # the chosen β's first-seed adapters are the grid's (not trained again)
    grid_dir = tmp_path / "run" / "adapters" / "seed0" / f"osrm-beta@beta={expected:g}"
    assert grid_dir.is_dir() and not (tmp_path / "run" / "adapters" / "seed0" / "osrm-beta").exists()
    # post: lora's adapters projected onto the OSRM subspace (lossy: some energy kept, not all)
    assert runs["post", 0]["init"] == "post" and not (tmp_path / "run" / "adapters" / "seed0" / "post").exists()
    kept = list(runs["post", 0]["post_retained_energy"].values())
    assert all(0 < k < 1 for k in kept)
    # every arm merges the same subsets, λ chosen on validation from the method's own grid
    subsets = {a: [m["tasks"] for m in r["subset_merges"]] for (a, s), r in runs.items()}
    assert len({json.dumps(v) for v in subsets.values()}) == 1 and len(subsets["lora"]) == 2
    assert all(m["lambda"] in (0.5, 1.0) for r in runs.values() for m in r["subset_merges"])
    assert all(list(m["val_curve"]) == ([1.0] if m["method"] == "ties" else [0.5, 1.0])
               for r in runs.values() for m in r["merges"])
    frozen = load_adapter(tmp_path / "run" / "adapters" / "seed0" / "freeze-comp" / next(iter(TOPICS)))
    assert frozen.metadata["compensation"] > 1   # OSRM's A passes less own energy than a random A
    from orthomerge.report import render_markdown

    report = render_markdown(json.loads(json.dumps(results)))
    assert f"β = {expected:g} chosen on seed 0" in report and "`post`: the trained adapters" in report
    assert "Departures from the official OSRM training recipe" in report and "ties: [1.0]" in report


def test_compensated_A_passes_a_random_directions_own_energy(tiny_bert):
    """Compensation multiplies A by c = e^(-1/2), e = its own-task energy relative to a random A of the same
    norm: the compensated A passes Σ tr(A S Aᵀ) = Σ ‖A₀‖² tr(S)/n, what a random A of A₀'s norm passes."""
    from orthomerge.adapters import lora_layers
    from orthomerge.stats import collect_stats
    from orthomerge.train import initialised_model

    tasks = load_tasks(["sentiment", "trec"], train_size=20, val_size=5, test_size=5)
    model, tok = load_model(tiny_bert), load_tokenizer(tiny_bert)
    stats = [collect_stats(model, tok, t.train.texts, ["query", "value"], progress=False) for t in tasks]

    def A_of(compensate):
        config = TrainConfig(init="osrm", rank=2, compensate=compensate, targets=["query", "value"])
        peft_model, meta = initialised_model(tiny_bert, tasks[0], config, others=stats[1:], own=stats[0])
        return {m: l.lora_A["default"].weight.detach().double() for m, l in lora_layers(peft_model).items()}, meta

    (plain, _), (scaled, meta) = A_of(False), A_of(True)
    assert meta["compensation"] > 1
    for m in plain:
        torch.testing.assert_close(scaled[m], plain[m] * meta["compensation"])
    passed = sum(float(torch.einsum("rn,nm,rm->", a, stats[0].second_moment(m), a)) for m, a in scaled.items())
    random = sum(float((a * a).sum() * torch.trace(stats[0].second_moment(m)) / a.shape[1]) for m, a in plain.items())
    assert passed == pytest.approx(random, rel=1e-6)


def test_experiment_presets_keep_their_settings_unless_an_option_is_given(monkeypatch):
    """`--study` is the preset as written; only the options a user gives override it (a parser default for
    --dtype or --model once replaced the preset's own)."""
    from dataclasses import replace

    from orthomerge.cli import build_parser
    from orthomerge.commands.experiment import build_config
    from orthomerge.experiment import ExperimentConfig

    written = replace(ExperimentConfig.study(), model="tiny", device="cpu", dtype="bfloat16")
    monkeypatch.setattr(ExperimentConfig, "study", classmethod(lambda cls, **overrides: replace(written, **overrides)))

    def config(*options):
        return build_config(build_parser().parse_args(["experiment", "--study", *options]))

    assert config() == written
    assert config("--dtype", "float32", "--model", "minilm") == replace(written, dtype="float32", model="minilm")


def test_train_cli_compensates_a_random_A_with_the_tasks_own_statistics(tiny_bert, tasks_yaml, tmp_path,
                                                                        monkeypatch):
    """`train --compensate` with an init that needs no other tasks' statistics still gets its own."""
    monkeypatch.setenv("ORTHOMERGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "adapter"
    assert cli(["train", "--model", tiny_bert, "--tasks", tasks_yaml, "--task", "mood", "--init", "orthogonal",
                "--compensate", "--epochs", "1", "--rank", "2", "--quiet", "--out", str(out)]) == 0
    meta = load_adapter(out).metadata
    assert meta["compensation"] > 0 and meta["config"]["compensate"]
