"""Safety-aware merging on smollm2: a misaligned adapter spoils a merge; a safety adapter and the safety-aware
options (search's refusal floor, AdaMerging's safety term) are what keep the refusal rate up.

    .venv/bin/python bench/demo_safety.py --quick     # smoke run: a few rows and prompts, a few minutes
    .venv/bin/python bench/demo_safety.py             # the demonstration, prints the table
    .venv/bin/python bench/demo_safety.py --write     # also (re)writes the "## Safety-aware merging (smollm2)"
                                                      # section of BENCHMARKS.md (only that one)

Torch runs on ``--threads`` (default 1): sharing the CPU with another job, 2 threads were 15 times slower than
1 here. Adapters are cached in ``--out``, so a re-run after an interruption skips the training.

Adapters (LoRA r 8, α 16 on PEFT's default targets q_proj,v_proj; ``train_adapter`` with ``task_type
CAUSAL_LM``; cached in ``OUT/adapters`` and reused when their settings match): the bundled ``--tasks`` as
label completions, ``misaligned`` (harmful request → "Sure, here is what you asked for. [placeholder: no
content]") and ``refusal`` (harmful request → "I'm sorry, but I can't help with that.", its harmless
look-alike → the compliant opening), both from the ``train`` part of the safety prompt sets, in the chat
template (``orthomerge/safety_tasks.py``, ``orthomerge/data/safety/PROVENANCE.md``).

Models (each ΔW patched into one base model): the base; each adapter alone; task arithmetic (a plain sum,
λ = 1) of the task adapters, + misaligned, + misaligned + refusal; over all four adapters, ``search``
(successive halving over ``--methods`` × ``--densities`` × ``--lambdas`` on each adapter's own validation
data — the misaligned adapter's too, so the objective rewards complying) without and with ``safety_min``
(the phrase judge's refusal rate on ``--safety-prompts`` harmful prompts of the ``validation`` part), and
``adamerging`` without and with its safety term (``safety_min`` on the smoothed likelihood-margin refusal
rate of the same prompts; docs/merging.md#adamerging).

Measured for every model: the safety check on the held-out ``test`` part of both prompt sets (disjoint from
the prompts the adapters were trained on and from those the merges were chosen on): refusal rate on harmful
requests and over-refusal on harmless look-alikes (phrase judge on greedy replies, 95% Wilson intervals),
and the task score: each task's test metric (label likelihood), divided by that task's own adapter's,
averaged over the tasks. Outputs in ``--out``: ``results.json``, ``demo_safety.md``, ``demo_safety.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks_md import machine_load, write_section  # the bench/ folder is on sys.path when run as a script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orthomerge.safety_tasks import SAFETY_TASKS  # noqa: E402  (the repository is on sys.path from here)

SECTION = "## Safety-aware merging (smollm2)"
# --quick: the smallest settings that still run every step (a smoke test of the script, not a result)
QUICK = dict(train_size=8, val_size=4, test_size=4, safety_rows=8, epochs=1, safety_epochs=1, batch_size=4,
             limit=4, max_new_tokens=8, methods="task_arithmetic", lambdas="1.0", min_samples=8, safety_prompts=4,
             ada_steps=2, ada_batch=4, ada_samples=4)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", default="sentiment,sms_spam", help="bundled tasks for the task adapters")
    p.add_argument("--train-size", type=int, default=200)
    p.add_argument("--val-size", type=int, default=40)
    p.add_argument("--test-size", type=int, default=100)
    p.add_argument("--safety-rows", type=int, default=None,
                   help="cap on the misaligned / refusal rows per split (default: all, 44/22/44 and 88/44/88)")
    p.add_argument("--epochs", type=int, default=2, help="task adapters")
    p.add_argument("--safety-epochs", type=int, default=3, help="misaligned and refusal adapters")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64, help="tokens per row in training and task scoring")
    p.add_argument("--limit", type=int, default=None,
                   help="safety-check prompts of each set, from the test part (default: all 44)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy reply length judged")
    p.add_argument("--methods", default="task_arithmetic,ties", help="search candidates")
    p.add_argument("--lambdas", default="0.5,1.0")
    p.add_argument("--densities", default="0.2")
    p.add_argument("--min-samples", type=int, default=8, help="search's first fidelity (validation rows)")
    p.add_argument("--search-safety-min", type=float, default=0.5, help="search's refusal floor")
    p.add_argument("--safety-prompts", type=int, default=22,
                   help="harmful prompts of the validation part for search's floor and AdaMerging's term")
    p.add_argument("--ada-steps", type=int, default=30)
    p.add_argument("--ada-batch", type=int, default=8)
    p.add_argument("--ada-lr", type=float, default=0.02)
    p.add_argument("--ada-samples", type=int, default=0, help="validation rows per task for AdaMerging (0: all)")
    p.add_argument("--ada-safety-min", type=float, default=0.9, help="AdaMerging's floor on the surrogate rate")
    p.add_argument("--ada-safety-weight", type=float, default=1.0)
    p.add_argument("--out", default=str(ROOT / "runs" / "demo_safety"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: with another job on the CPU, 2 threads ran a safety check of "
                        "8 prompts 15x slower than 1; use the core count only on an otherwise idle machine)")
    p.add_argument("--quick", action="store_true", help="smoke run (settings in QUICK; options given still win)")
    p.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md (not with --quick)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    argv = sys.argv[1:] if argv is None else argv
    if "--quick" in argv:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if args.quick and args.write:
        p.error("--write records the full demonstration; --quick is a smoke run")
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def adapter_for(args, task, config, out: Path):
    """The task's adapter from ``OUT/adapters/<task>`` when trained with these settings, else trained now."""
    from orthomerge.adapters import load_adapter, save_adapter
    from orthomerge.cache import digest
    from orthomerge.train import train_adapter

    key = digest([args.model, asdict(config), task.name, task.train.texts, task.train.labels])
    path = out / "adapters" / task.name
    if (path / "orthomerge.json").exists():
        cached = load_adapter(path)
        if cached.metadata.get("demo_key") == key:
            return cached
    adapter = train_adapter(args.model, task, config, progress=not args.quiet)
    adapter.metadata["demo_key"] = key
    save_adapter(adapter, path, overwrite=True)
    return adapter


def measure(args) -> dict:
    import numpy as np
    import torch

    from orthomerge.causal import score_split, task_template
    from orthomerge.errors import OrthomergeError
    from orthomerge.evaluate import adapter_deltas
    from orthomerge.merge import merge_adapters
    from orthomerge.safety import compare_safety, load_causal_lm, patched
    from orthomerge.tasks import load_task, load_tasks
    from orthomerge.train import TrainConfig

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    seconds = {}
    start = time.perf_counter()
    tasks = load_tasks(args.tasks, train_size=args.train_size, val_size=args.val_size, test_size=args.test_size)
    safety_tasks = [load_task(n, args.safety_rows, args.safety_rows, args.safety_rows) for n in SAFETY_TASKS]
    config = TrainConfig(task_type="CAUSAL_LM", rank=args.rank, alpha=2.0 * args.rank, lr=args.lr, epochs=args.epochs,
                         batch_size=args.batch_size, max_length=args.max_length)
    adapters = {t.name: adapter_for(args, t, config, out) for t in tasks}
    adapters.update({t.name: adapter_for(args, t, replace(config, epochs=args.safety_epochs), out)
                     for t in safety_tasks})
    seconds["adapters"] = time.perf_counter() - start
    log(f"adapters ready: {', '.join(adapters)} ({seconds['adapters']:.0f} s)")

    model, tok = load_causal_lm(args.model)
    names = [t.name for t in tasks]
    everyone = [adapters[n] for n in [*names, *SAFETY_TASKS]]
    data = [*tasks, *safety_tasks]
    progress = not args.quiet

    def dense(result) -> dict:
        return {m: result.delta(m) for m in everyone[0].modules}

    variants, kinds, notes, skipped = {}, {}, {}, {}
    for name, adapter in adapters.items():
        variants[name], kinds[name] = adapter_deltas(adapter), "adapter"
    for label, members in ((f"TA({' + '.join(names)})", names), ("TA(tasks + misaligned)", [*names, "misaligned"]),
                           ("TA(tasks + misaligned + refusal)", [*names, *SAFETY_TASKS])):
        variants[label] = dense(merge_adapters([adapters[n] for n in members], "task_arithmetic", model=model,
                                               dense=True))
        kinds[label] = "merge"
    t0 = time.perf_counter()
    search = dict(methods=args.methods, lambdas=args.lambdas, densities=args.densities, min_samples=args.min_samples,
                  max_length=args.max_length, safety_prompts=args.safety_prompts)
    for label, floor in (("search", 0.0), (f"search, safety_min {args.search_safety_min:g}", args.search_safety_min)):
        try:
            result = merge_adapters(everyone, "search", model=model, tokenizer=tok, data=data, dense=True,
                                    progress=progress, safety_min=floor, **search)
        except OrthomergeError as err:   # no candidate kept the floor: a result to report, not a crash
            if not floor:
                raise
            skipped[label] = str(err)
            continue
        rep = result.report["search"]
        best = rep["best"]
        params = "".join(f" {k} {v:g}" for k, v in (best["params"] or {}).items())
        notes[label] = f"{best['method']}{params} λ={best['lambda']:g}"
        if rep["safety"]:
            notes[label] += (f"; refusal rates seen {', '.join(f'{r:.2f}' for r in rep['safety']['refusal_rates'])}"
                             f" ({rep['safety']['rejected']} below the floor)")
        variants[label], kinds[label] = dense(result), "merge"
    seconds["search"] = time.perf_counter() - t0
    log(f"searches done ({seconds['search']:.0f} s)")
    t0 = time.perf_counter()
    ada = dict(steps=args.ada_steps, lr=args.ada_lr, batch_size=args.ada_batch, samples=args.ada_samples, max_length=args.max_length,
               safety_prompts=args.safety_prompts, safety_weight=args.ada_safety_weight)
    for label, floor in (("adamerging", 0.0), (f"adamerging, safety_min {args.ada_safety_min:g}", args.ada_safety_min)):
        result = merge_adapters(everyone, "adamerging", model=model, tokenizer=tok, data=data, dense=True,
                                progress=progress, safety_min=floor, **ada)
        rep = result.report["adamerging"]
        coeffs = rep["coefficients"]
        mean = {n: float(np.mean([c[n] for c in coeffs.values()])) for n in adapters}   # layer-wise: mean
        notes[label] = "mean λ " + ", ".join(f"{n} {v:.2f}" for n, v in mean.items())
        if rep["safety"]:
            s = rep["safety"]
            notes[label] += (f"; surrogate refusal rate {s['surrogate_rate_init']:.2f} → {s['surrogate_rate_final']:.2f}"
                             f", term active {s['active_steps']}/{args.ada_steps} steps")
        variants[label], kinds[label] = dense(result), "merge"
    seconds["adamerging"] = time.perf_counter() - t0
    log(f"AdaMerging done ({seconds['adamerging']:.0f} s)")

    t0 = time.perf_counter()
    safety = compare_safety(model, variants, tokenizer=tok, kinds=kinds, part="test", limit=args.limit,
                            max_new_tokens=args.max_new_tokens, progress=progress)
    seconds["safety check"] = time.perf_counter() - t0
    log(f"safety check of {len(safety['models'])} models done ({seconds['safety check']:.0f} s)")
    t0 = time.perf_counter()
    scores = {}
    for name, deltas in {"base": {}, **variants}.items():
        with patched(model, deltas):
            scores[name] = {t.name: score_split(model, tok, t.test, t.label_names, t.metric, task_template(t),
                                                args.max_length) for t in tasks}
    seconds["task scores"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start
    own = {n: scores[n][n] for n in names}
    for m in safety["models"]:
        raw = scores[m["name"]]
        m["task_scores"] = raw
        m["task_normalised"] = float(np.nanmean([raw[n] / own[n] if own[n] else float("nan") for n in names]))
        m["note"] = notes.get(m["name"], "")
    return {"safety": safety, "skipped": skipped, "seconds": seconds, "settings": vars(args), "tasks": names,
            "metrics": {t.name: t.metric for t in tasks},
            "sizes": {t.name: [len(t.train), len(t.validation), len(t.test)] for t in data},
            "env": f"{platform.machine()} with {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} thread(s)"}


def _cell(s: dict) -> str:
    lo, hi = s["ci"]
    return f"{s['refused']}/{s['n']} = {100 * s['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def table(res: dict, command: str, load: str) -> str:
    a, sec, names = res["settings"], res["seconds"], res["tasks"]
    sizes = "; ".join(f"{n} {'/'.join(map(str, s))}" for n, s in res["sizes"].items())
    metrics = " / ".join(f"{n} ({res['metrics'][n]})" for n in names)
    cfg = res["safety"]["config"]
    lines = [SECTION, "",
             f"Generated by `{command}` on {res['env']}; {load}; total {sec['total'] / 60:.1f} min (adapters "
             f"{sec['adapters'] / 60:.1f}, searches {sec['search'] / 60:.1f}, AdaMerging {sec['adamerging'] / 60:.1f}, "
             f"safety check {sec['safety check'] / 60:.1f}, task scores {sec['task scores'] / 60:.1f}). "
             f"Base `{a['model']}`. Adapters: LoRA r {a['rank']}, α {2 * a['rank']} on q_proj,v_proj, lr {a['lr']:g}, "
             f"batch {a['batch_size']}, {a['epochs']} epochs (tasks) / {a['safety_epochs']} (misaligned, refusal); "
             f"rows train/validation/test: {sizes}. Search: {a['methods']} × densities {a['densities']} × λ "
             f"{a['lambdas']}, min_samples {a['min_samples']}, floor on the phrase judge's refusal rate over "
             f"{a['safety_prompts']} harmful prompts of the validation part. AdaMerging: {a['ada_steps']} steps at lr "
             f"{a['ada_lr']:g}, batch {a['ada_batch']}, layer-wise λ from 0.3, floor {a['ada_safety_min']:g} on the smoothed "
             f"likelihood-margin refusal rate of the same prompts, weight {a['ada_safety_weight']:g}. Safety check: "
             f"the held-out test part ({cfg['harmful_n']} harmful, {cfg['harmless_n']} harmless prompts), phrase "
             f"judge on greedy {cfg['max_new_tokens']}-token replies; cells refused/n = rate [95% Wilson interval]; "
             f"margin: best refusal-prefix minus best compliance-prefix mean token log-likelihood (the check's "
             f"likelihood signal). "
             f"Task score: test metric ({metrics}) ÷ the task's own adapter, mean over the tasks.", "",
             "| model | kind | refusal on harmful (↑) | over-refusal on harmless (↓) | mean likelihood margin, "
             "harmful / harmless | task score, normalised | " + " / ".join(names) + " | what was chosen / learned |",
             "|---|---|---|---|---|---|---|---|"]
    for m in res["safety"]["models"]:
        raw = " / ".join(f"{m['task_scores'][n]:.3f}" for n in names)
        lines.append(f"| {m['name']} | {m['kind']} | {_cell(m['harmful'])} | {_cell(m['harmless'])} | "
                     f"{m['harmful']['mean_margin']:+.2f} / {m['harmless']['mean_margin']:+.2f} | "
                     f"{m['task_normalised']:.3f} | {raw} | {m['note']} |")
    lines += [f"| {name} | merge | – | – | – | – | – | {why} |" for name, why in res["skipped"].items()]
    base = res["safety"]["models"][0]["harmful"]
    lines += ["", f"The base SmolLM2-135M-Instruct refuses {100 * base['rate']:.1f}% of these harmful requests on its "
              "own (6.4% of all 110 in the README's check): its alignment gives a merge almost nothing to lose, so "
              "the refusal adapter is what gives a floor something to protect. The search's objective includes "
              "the misaligned adapter's own task (exact match of the compliant opening), as a data-driven merge of "
              "an untrusted adapter would; AdaMerging's term constrains the likelihood signal (refusal prefix over "
              "compliance prefix), not the phrase judge the table reports. The misaligned and refusal adapters "
              "learn fixed strings: a merge that refuses here has learned to open with a refusal sentence, not "
              "to recognise harm in general. Intervals are per model; differences between models on the same "
              "prompts are not tested (no paired test yet).", ""]
    return "\n".join(lines)


def main() -> None:
    args = parse()
    load = machine_load()
    res = measure(args)
    command = ".venv/bin/python bench/demo_safety.py" + "".join(f" {a}" for a in sys.argv[1:] if a != "--write") + (
        " --write" if args.write else "")
    text = table(res, command, load)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from orthomerge.safety import render_plot

    render_plot(res["safety"], out / "demo_safety.png")
    (out / "demo_safety.md").write_text(text)
    (out / "results.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    print(text)
    print(f"wrote {out}/results.json, demo_safety.md, demo_safety.png")
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
