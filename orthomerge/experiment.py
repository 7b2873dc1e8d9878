"""The end-to-end experiment: statistics → init → train → merge → evaluate → report.

For every seed and init arm, train one LoRA per task (cached and reused on a re-run), evaluate each
on its own task, merge all of them with every method over a λ grid, choose λ on the validation split
(never on test), report test metrics and normalised scores (merged ÷ the task's own adapter), and the
interference and drift diagnostics. :mod:`orthomerge.report` turns ``results.json`` into
``report.md`` and plots.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .adapters import LoraAdapter, load_adapter, save_adapter
from .cache import cached_stats, digest, loaded_once, precision_key
from . import causal, study
from .config import DEFAULT_DEVICE, DEFAULT_DTYPE, MODEL, STATS_SAMPLES
from .errors import OrthomergeError
from .outputs import EXPERIMENT_MARKER, atomic_file, check_output
from .evaluate import (TaskEvaluator, adapter_deltas, input_energy, interference_matrix, off_diagonal_mean,
                       subspace_drift)
from .merge import METHODS, get_method, merge_adapters
from .osrm import post_converted
from .models import load_tokenizer, resolve_device
from .stats import ActivationStats, collect_stats
from .tasks import Task, load_tasks
from .train import TrainConfig, train_adapter

# One or two per family, sized to the 20-minute budget on 2 cores; ``methods=["all"]`` runs every
# registered method (see ``orthomerge merge --list-methods``).
DEFAULT_METHODS = ["task_arithmetic", "ties", "dare_ties", "tsv", "iso_c", "iso_cts", "regmean", "emr"]
DEFAULT_LAMBDAS = [0.25, 0.5, 0.75, 1.0]
PAPER_LAMBDAS = [round(0.1 * k, 1) for k in range(1, 11)]   # the official code's λ grid 0.1, 0.2, …, 1.0
STUDY_TASKS = ("sentiment", "trec", "bbc", "sms_spam", "tweet_sentiment", "amazon_sentiment", "nyt_sentiment",
               "debate_party")


@dataclass
class ExperimentConfig:
    """Everything that defines a run; stored in ``results.json`` so a report says how it was made."""

    tasks: str | list[str] | None = None      # None: the bundled default suite; or names / a tasks.yaml
    model: str = MODEL
    inits: list[str] = field(default_factory=lambda: ["lora", "osrm"])
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    lambdas: list[float] = field(default_factory=lambda: list(DEFAULT_LAMBDAS))
    train_size: int = 600                     # the experiment's own split sizes, fitted to its time budget
    val_size: int = 100                       # (config.TRAIN_SIZE etc. are the tasks' defaults elsewhere)
    test_size: int = 300
    stats_samples: int = STATS_SAMPLES        # k samples per task for OSRM/RegMean (paper code: 100)
    train: TrainConfig = field(default_factory=TrainConfig)
    arms: dict[str, dict] = field(default_factory=dict)  # extra arms: name → TrainConfig overrides
    method_lambdas: dict[str, list[float]] = field(default_factory=dict)   # a method's own λ grid
    beta_grid: list[float] = field(default_factory=list)   # β candidates of an arm with "beta": "grid"
    ntasks: list[int] = field(default_factory=list)        # number-of-tasks curve: subset sizes N (study)
    ntasks_subsets: int = 2                                # subsets merged per N (study.task_subsets)
    ntasks_methods: list[str] = field(default_factory=lambda: ["task_arithmetic"])
    ntasks_arms: list[str] = field(default_factory=list)   # arms with the number-of-tasks curve (empty: all)
    ntasks_lambdas: list[float] = field(default_factory=list)   # its λ grid (empty: each method's own)
    heads_only: bool = True                                # the "trained heads alone" baseline row
    safety: int = 0                              # causal LMs: prompts per set for the safety check (0: off)
    device: str = DEFAULT_DEVICE                 # where models run (not part of any cache key)
    dtype: str = DEFAULT_DTYPE                   # the base model's precision

    @property
    def causal(self) -> bool:
        """Tasks learned as prompt → label completion by a causal LM (``train.task_type="CAUSAL_LM"``)."""
        return str(self.train.task_type).upper() == "CAUSAL_LM"

    def statistics_rows(self, task: Task, split, tokenizer=None):
        """The rows whose target-module inputs the statistics describe: the texts, or a causal LM's prompts in
        the task's template (the chat template needs ``tokenizer``)."""
        return causal.statistics_rows(split, task.label_names, self.stats_samples, self.train.task_type,
                                      causal.task_template(task, self.train.prompt), tokenizer)

    def placement(self) -> dict:
        """How the base model is loaded for this run (task type, device, precision)."""
        return {"task_type": "CAUSAL_LM" if self.causal else "SEQ_CLS", "device": resolve_device(self.device),
                "dtype": self.dtype}

    @classmethod
    def quick(cls, **overrides) -> "ExperimentConfig":
        """A smoke run: 3 tasks, small splits, one epoch, a few methods — all outputs in minutes."""
        base = cls(tasks=["sentiment", "trec", "sms_spam"], train_size=200, val_size=60, test_size=80,
                   stats_samples=40, methods=["task_arithmetic", "ties", "tsv", "regmean", "emr"],
                   lambdas=[0.5, 1.0], train=TrainConfig(lr=1e-2, epochs=2))
        return replace(base, **overrides)

    @classmethod
    def study(cls, **overrides) -> "ExperimentConfig":
        """The OSRM study (docs/osrm.md#the-study): all eight bundled tasks, five seeds, the paper's baseline
        (gaussian) and the scale controls beside OSRM and its variants (:func:`study_arms`), task arithmetic
        over the paper's λ grid and TIES, the number-of-tasks curve on the core arms; the base in its own
        precision (float32 for MiniLM; ``dtype="bfloat16"`` halves the evaluation time on a CPU with bf16
        units, but the study's published numbers are float32)."""
        base = cls(tasks=list(STUDY_TASKS), train_size=400, val_size=100, test_size=500,
                   inits=["lora", "gaussian", "osrm", "orthogonal"], seeds=list(range(5)),
                   methods=["task_arithmetic", "ties"], lambdas=list(PAPER_LAMBDAS),
                   method_lambdas={"ties": list(DEFAULT_LAMBDAS)}, arms=study_arms(TrainConfig().rank),
                   beta_grid=[0.03, 0.3], ntasks=[2, 4, 6], ntasks_subsets=1, ntasks_lambdas=list(DEFAULT_LAMBDAS),
                   ntasks_arms=["lora", "gaussian", "osrm", "orthogonal"], heads_only=False)
        return replace(base, **overrides)

    def arm_configs(self) -> dict[str, "Arm"]:
        """Arm name → :class:`Arm`: one per init, plus the named extra arms (``arms``: TrainConfig overrides;
        ``"beta": "grid"`` picks β from ``beta_grid`` on the first seed, ``"post": ARM`` converts that arm's
        trained adapters at merge time, ``"seeds": n`` runs the first n seeds only)."""
        arms = {init: Arm(init, replace(self.train, init=init), self.seeds) for init in self.inits}
        for name, overrides in self.arms.items():
            overrides = dict(overrides)
            post_of = overrides.pop("post", None)
            seeds = self.seeds[:overrides.pop("seeds")] if "seeds" in overrides else self.seeds
            grid = overrides.get("beta") == "grid"
            if grid:
                overrides["beta"] = 0.0
                if not self.beta_grid:
                    raise OrthomergeError(f"arm {name!r}: beta 'grid' needs a beta_grid")
            if post_of is not None and post_of not in arms:
                raise OrthomergeError(f"arm {name!r}: post of {post_of!r}, which is not an earlier arm")
            arms[name] = Arm(name, replace(self.train, **overrides), seeds, post_of=post_of, beta_grid=grid)
        if any(a.beta_grid for a in arms.values()) and "lora" not in arms:
            raise OrthomergeError("choosing β from a grid needs the lora arm (the single-task reference)")
        return arms

    def lambdas_for(self, method: str) -> list[float]:
        """The λ grid of ``method`` (its own in ``method_lambdas``, else ``lambdas``)."""
        return self.method_lambdas.get(method, self.lambdas)


@dataclass
class Arm:
    """One arm of the experiment: its training config; or ``post_of``, an earlier arm whose trained
    adapters are converted onto the OSRM subspace at merge time (the paper's "post"); ``beta_grid``:
    β is chosen from the experiment's grid on the first seed (validation, :func:`study.choose_beta`)."""

    name: str
    config: TrainConfig
    seeds: list[int]
    post_of: str | None = None
    beta_grid: bool = False


def beta_folder(arm: str, beta: float) -> str:
    """The adapters folder (and evaluation name) of one β of an arm's grid."""
    return f"{arm}@beta={beta:g}"


def study_arms(rank: int) -> dict[str, dict]:
    """The study's arms beyond the inits: OSRM variants and training options (``seeds``: fewer seeds)."""
    return {   # in order of importance: an interrupted study has the first arms for every seed
        "osrm-selective": {"init": "osrm", "variant": "selective"},
        "osrm-beta": {"init": "osrm", "beta": "grid"},          # β chosen on the first seed's validation
        "post": {"post": "lora"},     # lora's adapters projected at merge time (lossy: little to lose merged)
        # A kept in its subspace (frozen, or projected onto the 4r least-used directions) and scaled to pass
        # a random A's own-task energy: without it these adapters starved (earlier study)
        "osrm-freezeA-comp": {"init": "osrm", "freeze": "A", "compensate": True, "seeds": 3},
        "osrm-subspace-comp": {"init": "osrm", "subspace_k": 4 * rank, "compensate": True, "seeds": 3},
        "lora-unit": {"init": "lora-unit", "seeds": 3},       # PEFT's default A rescaled to unit rows
    }


class Experiment:
    """Runs :class:`ExperimentConfig` into ``out``; every stage caches what it can reuse."""

    def __init__(self, config: ExperimentConfig, out: str | Path, progress: bool = True, command: str = ""):
        """``command``: how the run was started, kept in results.json for the report's "Made by"."""
        self.config, self.out, self.progress, self.command = config, Path(out), progress, command
        self.tasks: list[Task] = []
        self.stats: dict[str, ActivationStats] = {}
        self.heldout: dict[str, ActivationStats] = {}
        self.log = lambda msg: tqdm.write(msg) if progress else None
        self.reused_runs = 0   # (seed, arm) evaluations taken from an earlier invocation's cache

    # ------------------------------------------------------------ stages

    def load_tasks(self) -> None:
        c = self.config
        self.tasks = load_tasks(c.tasks, train_size=c.train_size, val_size=c.val_size, test_size=c.test_size)
        if len(self.tasks) < 2:
            raise OrthomergeError("merging needs at least two tasks")

    def collect_statistics(self) -> None:
        """Per task, from the pre-trained model: k training samples (init, RegMean) and k validation
        samples (held-out inputs for the interference diagnostics)."""
        c = self.config
        base = loaded_once(c.model, **c.placement())
        tokenizer = load_tokenizer(c.model) if c.causal else None
        for task in tqdm(self.tasks, desc="statistics", disable=not self.progress):
            for kind, split, table in (("train", task.train, self.stats), ("heldout", task.validation, self.heldout)):
                table[task.name] = cached_stats(self.out / "stats", c.model,
                                                c.statistics_rows(task, split, tokenizer),
                                                c.train.targets, c.train.max_length, name=f"{task.name}.{kind}",
                                                base=base, dtype=c.dtype)

    def adapter(self, arm: str, config: TrainConfig, task: Task) -> LoraAdapter:
        """Train (or reuse from the cache) one task's adapter for one arm and seed."""
        c = self.config
        others = [self.stats[t.name] for t in self.tasks if t.name != task.name]
        used = [s.meta.get("data") for s in others] if config.needs_stats else []
        if config.compensate and not used:   # a random A scaled by its own energy: its own statistics key it
            used.append(self.stats[task.name].meta.get("data"))   # (else the others' keys already fix them)
        key = digest([c.model, asdict(config), task.name, len(task.train), task.seed, task.train.texts[:5],
                      used or None] + precision_key(c.dtype))
        path = self.out / "adapters" / f"seed{config.seed}" / arm / task.name
        stale = (path / "orthomerge.json").exists()
        if stale:
            cached = load_adapter(path)
            if cached.metadata.get("cache_key") == key:
                return cached
        # a cached adapter of other settings is this experiment's own output: replaced, like a stale
        # evaluation (check_output still refuses, before training, a folder orthomerge did not write)
        check_output(path, overwrite=stale)
        adapter = train_adapter(c.model, task, config, others=others, own=self.stats[task.name],
                                progress=self.progress, device=c.device, dtype=c.dtype)
        adapter.metadata.update(cache_key=key, arm=arm)
        save_adapter(adapter, path, overwrite=stale)
        return adapter

    def run(self) -> dict:
        started = time.time()
        c = self.config
        if c.methods == ["all"]:
            c = self.config = replace(c, methods=list(METHODS))
        for method in c.methods:
            if get_method(method).needs_data and c.causal:   # unknown names, too, fail before any training
                raise OrthomergeError(f"{method}: the experiment runs no data-driven merge on causal-LM tasks "
                                      "(orthomerge merge runs search and adamerging on causal-LM adapters)")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / EXPERIMENT_MARKER).touch()   # an interrupted run's folder is recognised and resumed
        self.load_tasks()
        self.collect_statistics()
        placement = c.placement()
        evaluator = TaskEvaluator(c.model, self.tasks, c.train.max_length, task_type=placement["task_type"],
                                  prompt=c.train.prompt, device=placement["device"], dtype=c.dtype)
        names = [t.name for t in self.tasks]
        arms = c.arm_configs()
        results = {
            "command": self.command,
            "config": asdict(c),
            "tasks": [{"name": t.name, "metric": t.metric, "labels": t.label_names, "source": t.source,
                       "sizes": [len(t.train), len(t.validation), len(t.test)]} for t in self.tasks],
            "task_names": names,
            "runs": [],
            "expected_runs": sum(len(a.seeds) for a in arms.values()),
        }
        first_seed = {}   # arm -> the first seed's adapters (the safety check's variants)
        for arm in arms.values():  # arms outer: an interrupted run has every seed of the first arms
            for seed in arm.seeds:
                config, adapters = self.arm_adapters(arms, arm, seed, evaluator, results)
                first_seed.setdefault(arm.name, adapters)
                results["runs"].append(self.evaluate_arm_or_reuse(evaluator, arm.name, config, adapters,
                                                                  init="post" if arm.post_of else config.init))
                self.log(f"seed {seed} {arm.name}: " + ", ".join(
                    f"{r['method']} {r['test_normalised_mean']:.3f}" for r in results["runs"][-1]["merges"]))
                results["seconds"] = round(time.time() - started, 1)
                results["reused_runs"] = self.reused_runs
                self._write(results)  # after every arm: an interrupted run still has a (partial) report
        if c.causal and c.safety:
            results["safety"] = self.safety_check(evaluator, first_seed, results)
            self._write(results)
        return results

    def arm_adapters(self, arms: dict[str, Arm], arm: Arm, seed: int, evaluator: TaskEvaluator,
                     results: dict) -> tuple[TrainConfig, list[LoraAdapter]]:
        """``arm``'s training config at ``seed`` and its adapters, one per task: trained (or reused from the
        cache), or converted from another arm's (post)."""
        config = replace(arm.config, seed=seed)
        if arm.post_of is not None:
            source = replace(arms[arm.post_of].config, seed=seed)
            trained = [self.adapter(arm.post_of, source, t) for t in self.tasks]
            return source, post_converted(trained, [self.stats[t.name] for t in self.tasks], config.variant,
                                          config.beta)
        folder = arm.name
        if arm.beta_grid:
            config = replace(config, beta=self.chosen_beta(arm, evaluator, results))
            folder = beta_folder(arm.name, config.beta)   # the grid's first-seed adapters are reused
        return config, [self.adapter(folder, config, t) for t in self.tasks]

    def chosen_beta(self, arm: Arm, evaluator: TaskEvaluator, results: dict) -> float:
        """β of ``arm`` from ``beta_grid``, chosen once on the first seed by the study's rule on validation
        (:func:`study.choose_beta`: the best task-arithmetic validation score among the β whose single-task
        validation mean is within 1 point of lora's); recorded in ``results["beta_choice"]``."""
        choices = results.setdefault("beta_choice", {})
        if arm.name in choices:
            return choices[arm.name]["chosen"]
        first = self.config.seeds[0]
        reference = next((r for r in results["runs"] if r["arm"] == "lora" and r["seed"] == first), None)
        if reference is None:
            raise OrthomergeError(f"arm {arm.name!r}: β is chosen against lora's first seed, which must run first")
        merged, single = {}, {}
        for beta in self.config.beta_grid:
            config = replace(arm.config, seed=first, beta=beta)
            name = beta_folder(arm.name, beta)
            adapters = [self.adapter(name, config, t) for t in self.tasks]
            run = self.evaluate_arm_or_reuse(evaluator, name, config, adapters, init=config.init,
                                             methods=[study.DECISION_METHOD], full=False)
            ta = next(m for m in run["merges"] if m["method"] == study.DECISION_METHOD)
            merged[beta] = study.validation_choice(ta)
            single[beta] = float(np.mean(list(run["single"]["validation"].values())))
        reference_single = float(np.mean(list(reference["single"]["validation"].values())))
        chosen = study.choose_beta(merged, single, reference_single)
        choices[arm.name] = {"grid": list(self.config.beta_grid), "validation_merged": merged,
                             "validation_single": single, "reference_single": reference_single,
                             "seed": first, "chosen": chosen}
        self.log(f"{arm.name}: β = {chosen:g} chosen on validation from {self.config.beta_grid}")
        return chosen

    def safety_check(self, evaluator: TaskEvaluator, adapters_by_arm: dict, results: dict) -> dict:
        """Refusal and over-refusal rates (``c.safety`` prompts of each bundled set) of the base, every
        adapter of each arm's first seed, and each of its single-model merges at the λ chosen on validation."""
        from .safety import compare_safety

        c = self.config
        names = [t.name for t in self.tasks]
        model = evaluator.models[names[0]]
        variants, kinds = {}, {}
        for arm, adapters in adapters_by_arm.items():
            run = next(r for r in results["runs"] if r["arm"] == arm)
            for name, adapter in zip(names, adapters):
                variants[f"{arm} {name}"], kinds[f"{arm} {name}"] = adapter, "adapter"
            for merge in run["merges"]:
                spec = get_method(merge["method"]) if merge["method"] in METHODS else None
                if spec is None or spec.per_task or spec.needs_data:
                    continue
                stats = [self.stats[n] for n in names] if spec.needs_stats else None
                params = {"scale": merge["lambda"]} if "scale" in spec.defaults else {}
                merged = merge_adapters(adapters, method=spec.name, stats=stats, dense=True, model=model, **params)
                key = f"{arm} {spec.name} λ={merge['lambda']:g}"
                variants[key] = {m: merged.delta(m) for m in adapters[0].modules}
                kinds[key] = "merge"
        return compare_safety(model, variants, tokenizer=evaluator.tokenizer, kinds=kinds, limit=c.safety,
                              progress=self.progress)

    def _write(self, results: dict) -> None:
        with atomic_file(self.out / "results.json") as tmp:
            tmp.write_text(json.dumps(results, indent=2, default=float) + "\n")

    def evaluate_arm_or_reuse(self, evaluator: TaskEvaluator, arm: str, config: TrainConfig,
                              adapters: list[LoraAdapter], init: str, methods: list[str] | None = None,
                              full: bool = True) -> dict:
        """:meth:`evaluate_arm`, or its result cached beside the adapters by an earlier invocation (keyed by
        the adapters, methods, λ grids, splits and what else the evaluation computes)."""
        c = self.config
        methods = methods or c.methods
        converted = [a.metadata["post"] for a in adapters if "post" in a.metadata]   # a post arm's conversion
        subset_grids = c.ntasks_lambdas or ({m: c.lambdas_for(m) for m in c.ntasks_methods} if c.ntasks else [])
        key = digest([[a.metadata.get("cache_key") for a in adapters] + ([converted] if converted else []),
                      init, methods,
                      {m: c.lambdas_for(m) for m in methods}, c.val_size, c.test_size, c.stats_samples,
                      [t.test.texts[:3] for t in self.tasks],
                      [c.heads_only, c.ntasks, c.ntasks_subsets, c.ntasks_methods, subset_grids,
                       not c.ntasks_arms or arm in c.ntasks_arms] if full else "short"])
        path = self.out / "evaluations" / f"seed{config.seed}" / f"{arm}.json"
        if path.exists():
            cached = json.loads(path.read_text())
            if cached.get("cache_key") == key:
                self.reused_runs += 1
                return cached["run"]
        run = self.evaluate_arm(evaluator, arm, config, adapters, init, methods, full)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps({"cache_key": key, "run": run}, default=float) + "\n")
        return run

    # ------------------------------------------------------------ evaluation of one arm

    def evaluate_arm(self, evaluator: TaskEvaluator, arm: str, config: TrainConfig, adapters: list[LoraAdapter],
                     init: str, methods: list[str], full: bool = True) -> dict:
        """Single-task scores, every method's merge (λ on validation, test at that λ), the number-of-tasks
        merges and the interference and drift diagnostics of one arm and seed (``full=False``: only the
        single-task scores and ``methods``' merges, e.g. to choose β)."""
        c = self.config
        names = [t.name for t in self.tasks]
        heads = {n: a.heads for n, a in zip(names, adapters)}
        single = {split: {n: evaluator.score(n, adapter_deltas(a), a.heads, split) for n, a in zip(names, adapters)}
                  for split in ("validation", "test")}
        merges = [self._heads_only(evaluator, heads, single)] if c.heads_only and full else []
        bar = tqdm(methods, desc=f"merge seed{config.seed} {arm}", disable=not self.progress)
        for method in bar:
            merges.append(self._merge(evaluator, method, adapters, heads, single))
        run = {"arm": arm, "init": init, "seed": config.seed, "train_config": asdict(config), "single": single,
               "train_history": {n: a.metadata.get("history") for n, a in zip(names, adapters)},
               "train_seconds": {n: a.metadata.get("train_seconds") for n, a in zip(names, adapters)},
               "merges": merges}
        if not full:
            return run
        if c.ntasks and (not c.ntasks_arms or arm in c.ntasks_arms):
            run["subset_merges"] = self._subset_merges(evaluator, adapters, heads, single, config.seed, arm)
        post = [a.metadata.get("post_report", {}).get("retained_energy") for a in adapters]
        if any(p is not None for p in post):
            run["post_retained_energy"] = dict(zip(names, post))
        held = [self.heldout[n] for n in names]
        interference = interference_matrix(adapters, held)
        per_module = interference_matrix(adapters, held, per_module=True)
        ta = next((m for m in merges if m["method"] == "task_arithmetic"), None)
        energy_init = [[input_energy(aj.initial_A, held[i]) if aj.initial_A else None for aj in adapters]
                       for i in range(len(adapters))]
        energy_trained = [[input_energy(aj.A, held[i]) for aj in adapters] for i in range(len(adapters))]
        return {
            **run,
            "interference": interference.tolist(),
            "interference_per_module": {m: off_diagonal_mean(v) for m, v in per_module.items()},
            "interference_merged": (self._merged_interference(evaluator, adapters, ta["lambda"]).tolist()
                                    if ta else None),
            "input_energy_init": energy_init,
            "input_energy_trained": energy_trained,
            "drift": {n: subspace_drift(a) for n, a in zip(names, adapters)},
        }

    def _merged_interference(self, evaluator: TaskEvaluator, adapters: list[LoraAdapter], lam: float) -> np.ndarray:
        """Interference ratios on the activations of the task-arithmetic merge at its chosen λ: the
        inputs each adapter really sees once merged (deeper layers' inputs shift after merging)."""
        c = self.config
        names = [t.name for t in self.tasks]
        result = merge_adapters(adapters, method="task_arithmetic", dense=True, model=evaluator.models[names[0]],
                                scale=lam)
        stats = []
        with evaluator.patched(names[0], {m: result.delta(m) for m in adapters[0].modules},
                               adapters[0].heads) as merged:
            for task in self.tasks:
                data = c.statistics_rows(task, task.validation, evaluator.tokenizer)
                stats.append(collect_stats(merged, evaluator.tokenizer, data.texts, c.train.targets,
                                           pairs=data.pairs, max_length=c.train.max_length, progress=False))
        return interference_matrix(adapters, stats)

    def _scores(self, evaluator, deltas_for, heads, single, split) -> tuple[dict, dict, float]:
        raw = {n: evaluator.score(n, deltas_for(n), heads[n], split) for n in heads}
        norm = {n: raw[n] / single[split][n] if single[split][n] else float("nan") for n in raw}
        return raw, norm, float(np.nanmean(list(norm.values())))  # a task whose own adapter scored 0 is skipped

    def _heads_only(self, evaluator, heads, single) -> dict:
        """Baseline: the base model with each task's trained head and no LoRA update (ΔW = 0)."""
        raw, norm, mean = self._scores(evaluator, lambda n: {}, heads, single, "test")
        return {"method": "heads_only", "lambda": 0.0, "val_curve": {}, "test": raw, "test_normalised": norm,
                "test_normalised_mean": mean, "test_mean": float(np.mean(list(raw.values()))), "seconds": 0.0}

    def _subset_merges(self, evaluator, adapters, heads, single, seed: int, arm: str) -> list[dict]:
        """The number-of-tasks curve: each of ``ntasks_methods`` on the same task subsets in every arm
        (:func:`study.task_subsets`, fixed seed 0), λ chosen on the subset's validation rows."""
        c = self.config
        names = [t.name for t in self.tasks]
        subsets = study.task_subsets(names, [n for n in c.ntasks if n < len(names)], seed=0,
                                     per_size=c.ntasks_subsets)
        jobs = [(method, subset) for subsets_n in subsets.values() for subset in subsets_n
                for method in c.ntasks_methods]
        out = []
        for method, subset in tqdm(jobs, desc=f"subsets seed{seed} {arm}", disable=not self.progress):
            chosen = [adapters[names.index(n)] for n in subset]
            merge = self._merge(evaluator, method, chosen, {n: heads[n] for n in subset}, single, list(subset),
                                c.ntasks_lambdas or None)
            out.append({"tasks": list(subset), **{k: merge[k] for k in ("method", "lambda", "val_curve",
                                                                        "test_normalised_mean")}})
        return out

    def _merge(self, evaluator, method, adapters, heads, single, names: list[str] | None = None,
               lambdas: list[float] | None = None) -> dict:
        """Merge once at λ = 1; every method here is linear in its ``scale``, so λ·ΔW is the λ-merge.
        ``names``: the tasks of ``adapters`` (default every task); ``lambdas``: the λ grid (default the
        method's)."""
        names = names or [t.name for t in self.tasks]
        tasks = [next(t for t in self.tasks if t.name == n) for n in names]
        spec = get_method(method)
        params = {"scale": 1.0} if "scale" in spec.defaults else {}
        stats = [self.stats[n] for n in names] if spec.needs_stats else None
        # data-driven methods get the task splits (fisher: train rows; adamerging, search: validation inputs;
        # never test) and run them through W₀, which the evaluator's models hold between scores
        data = tasks if spec.needs_data else None
        t0 = time.time()
        # dense=True: evaluate the method's own ΔW (no re-compression), validated against the loaded base
        result = merge_adapters(adapters, method=method, stats=stats, dense=True, model=evaluator.models[names[0]],
                                data=data, **params)
        seconds = time.time() - t0
        per_task = spec.per_task
        deltas = {n: {m: result.delta(m, n if per_task else None) for m in adapters[0].modules}
                  for n in (names if per_task else names[:1])}
        lambdas = (lambdas or self.config.lambdas_for(method)) if "scale" in spec.defaults else [1.0]

        def scaled(lam):
            return lambda n: {m: d * lam for m, d in deltas[n if per_task else names[0]].items()}

        curve = {}
        for lam in lambdas:
            _, _, curve[lam] = self._scores(evaluator, scaled(lam), heads, single, "validation")
        best = max(curve, key=lambda lam: (curve[lam], -abs(lam - 1.0)))
        raw, norm, mean = self._scores(evaluator, scaled(best), heads, single, "test")
        return {"method": method, "lambda": best, "val_curve": curve, "test": raw, "test_normalised": norm,
                "test_normalised_mean": mean, "test_mean": float(np.mean(list(raw.values()))),
                "seconds": round(seconds, 3)}
