"""Precision on CPU: statistics and training throughput and peak memory of smollm2 in float32 vs bfloat16.

    .venv/bin/python bench/bench_dtype.py                   # measure, print the table
    .venv/bin/python bench/bench_dtype.py --write           # also (re)write the "## Precision: float32 vs
                                                            # bfloat16 on CPU (smollm2)" section of BENCHMARKS.md
    .venv/bin/python bench/bench_dtype.py --gpu             # GPU figures of a Llama-3.2-1B-shaped random model
                                                            # (needs CUDA; prints one JSON line, writes nothing)

CPU mode. Base: the bundled decoder ``smollm2`` (SmolLM2-135M-Instruct) as ``CAUSAL_LM``. Each (stage, dtype)
runs in a fresh subprocess (``--child STAGE DTYPE``, one JSON line on stdout) so that its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss`` at its end, nothing subtracted: torch, tokenizer and model included) is
its own; the dtypes alternate within each of ``--repeat`` rounds and the best time is kept.

* ``stats``: ``collect_stats(model, tok, prompts, ["q_proj", "v_proj"], max_length=64, batch_size=16)`` over the
  first ``--stats-rows`` training prompts of ``sentiment`` (the task's texts verbalised as the causal-LM
  experiment collects them, ``causal.prompt_split``); time = that call only (the model already loaded);
  tokens/s = ``stats.token_count`` / time. The bf16 Gram matrices are compared with the float32 ones
  (relative Frobenius error per distinct input: q_proj and v_proj share theirs).
* ``train``: ``train_adapter("smollm2", task, TrainConfig(task_type="CAUSAL_LM", rank=8, epochs=1, batch_size=8,
  max_length=64), dtype=...)`` on ``--train-rows`` rows of ``sentiment`` (validation 10, test 10); time = the
  whole call (loading the model, the epoch, scoring the 10 validation rows); tokens/s = the real (unpadded)
  prompt + completion + EOS tokens of one epoch, counted with ``causal.verbalise`` + ``causal.encode_completions``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks_md import write_section  # the bench/ folder is on sys.path when run as a script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## Precision: float32 vs bfloat16 on CPU (smollm2)"
DTYPES = ["float32", "bfloat16"]
STAGES = ["stats", "train"]
TARGETS = ["q_proj", "v_proj"]
TOLERANCE = 0.05        # the library's stated bf16-vs-float32 Gram tolerance (tests/test_real_models.py, tiny models)


def peak_rss_mib() -> float:
    """This process's peak resident set (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_line(threads: int) -> str:
    """CPU model, cores, bf16 instructions, torch version, threads."""
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "no bf16 instructions"
    return (f"{model} ({os.cpu_count()} cores, {platform.machine()}, {bf16}), torch {torch.__version__}, "
            f"{threads} thread(s)")


# ---------------------------------------------------------------- children (one measurement each)


def child(stage: str, dtype: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from orthomerge.tasks import load_task

    if stage == "stats":
        from orthomerge.causal import prompt_split
        from orthomerge.models import load_model, load_tokenizer
        from orthomerge.stats import collect_stats

        task = load_task("sentiment", train_size=args.stats_rows, val_size=10, test_size=10)
        texts = prompt_split(task.train, task.label_names).texts
        tokenizer = load_tokenizer("smollm2")
        start = time.perf_counter()
        model = load_model("smollm2", task_type="CAUSAL_LM", dtype=dtype)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        stats = collect_stats(model, tokenizer, texts, TARGETS, max_length=64, batch_size=16, progress=False)
        seconds = time.perf_counter() - start
        if args.grams:
            torch.save(stats.grams, args.grams)
        return {"stage": stage, "dtype": dtype, "seconds": seconds, "load_s": load_s, "rows": len(texts),
                "tokens": stats.token_count, "inputs": len(stats.groups), "peak_rss_mib": peak_rss_mib()}
    from orthomerge.causal import encode_completions, verbalise
    from orthomerge.models import load_tokenizer
    from orthomerge.train import TrainConfig, train_adapter

    task = load_task("sentiment", train_size=args.train_rows, val_size=10, test_size=10)
    config = TrainConfig(task_type="CAUSAL_LM", rank=8, epochs=1, batch_size=8, max_length=64)
    data = verbalise(task.train, task.label_names, config.prompt or None)
    rows = encode_completions(load_tokenizer("smollm2"), data.prompts, data.completions, config.max_length)
    tokens = sum(len(r["input_ids"]) for r in rows)
    start = time.perf_counter()
    adapter = train_adapter("smollm2", task, config, progress=False, dtype=dtype)
    seconds = time.perf_counter() - start
    last = adapter.metadata["history"][-1]
    return {"stage": stage, "dtype": dtype, "seconds": seconds, "rows": len(task.train), "tokens": tokens,
            "train_loss": last["train_loss"], "val": last[f"val_{task.metric}"],
            "dtype_seen": adapter.metadata["dtype"], "peak_rss_mib": peak_rss_mib()}


def run_child(stage: str, dtype: str, args, grams: Path | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, dtype, "--threads", str(args.threads),
           "--stats-rows", str(args.stats_rows), "--train-rows", str(args.train_rows)]
    if grams is not None:
        cmd += ["--grams", str(grams)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    if done.returncode or not lines:
        sys.exit(f"child {stage} {dtype} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------- parent: measure, compare, tabulate


def gram_errors(full: Path, half: Path) -> list[float]:
    """Relative Frobenius error ‖G_bf16 − G_fp32‖ / ‖G_fp32‖ of every distinct input."""
    import torch

    a, b = torch.load(full), torch.load(half)
    if set(a) != set(b):
        sys.exit(f"the two statistics describe different inputs: {sorted(set(a) ^ set(b))}")
    return [float(torch.linalg.norm(b[k] - a[k]) / torch.linalg.norm(a[k])) for k in a]


def measure(args) -> tuple[list[dict], dict]:
    import numpy as np

    started, load = time.perf_counter(), os.getloadavg()[0]
    folder = Path(tempfile.mkdtemp(prefix="bench_dtype_"))
    runs: dict[tuple[str, str], list[dict]] = {(s, d): [] for s in STAGES for d in DTYPES}
    for r in range(args.repeat):
        order = DTYPES if r % 2 == 0 else DTYPES[::-1]   # alternate which dtype goes first
        for stage in args.stages.split(","):
            for dtype in order:
                grams = folder / f"{dtype}.pt" if stage == "stats" and not runs[stage, dtype] else None
                out = run_child(stage, dtype, args, grams)
                runs[stage, dtype].append(out)
                print(json.dumps(out), flush=True)
    rows = []
    for (stage, dtype), outs in runs.items():
        if not outs:
            continue
        best = min(outs, key=lambda o: o["seconds"])
        rows.append({**best, "times": [o["seconds"] for o in outs],
                     "peak_rss_mib": max(o["peak_rss_mib"] for o in outs),
                     "throughput": best["tokens"] / best["seconds"]})
    for row in rows:
        base = next(r for r in rows if r["stage"] == row["stage"] and r["dtype"] == "float32")
        row["ratio"] = {k: row[k] / base[k] for k in ("seconds", "throughput", "peak_rss_mib")}
    info = {"env": cpu_line(args.threads), "repeat": args.repeat, "total_s": time.perf_counter() - started,
            "stats_rows": args.stats_rows, "train_rows": args.train_rows,
            "load": (load, os.getloadavg()[0])}
    if (folder / "float32.pt").exists() and (folder / "bfloat16.pt").exists():
        errors = gram_errors(folder / "float32.pt", folder / "bfloat16.pt")
        info["gram"] = {"max": max(errors), "median": float(np.median(errors)), "inputs": len(errors)}
        counts = {r["dtype"]: r["tokens"] for r in rows if r["stage"] == "stats"}
        info["same_tokens"] = counts["float32"] == counts["bfloat16"]
    return rows, info


def table(rows, info, command: str, note: str = "") -> str:
    lines = [SECTION, "",
             f"Generated by `{command}` on {info['env']}; total {info['total_s']:.0f} s. Each (stage, dtype) in "
             f"a fresh process (1-min load average {info['load'][0]:.2f} at the start, {info['load'][1]:.2f} at "
             f"the end, on a machine shared with other work), dtypes alternating, best time of {info['repeat']}. smollm2 "
             "(SmolLM2-135M-Instruct) as `CAUSAL_LM` from `load_model(..., dtype=...)`. **stats**: `collect_stats` "
             f"on q_proj, v_proj over {info['stats_rows']} `sentiment` training prompts (`causal.prompt_split`), "
             "max_length 64, batch 16; time = that call, the model already loaded; tokens/s = `stats.token_count` "
             f"/ time. **train**: `train_adapter` on {info['train_rows']} `sentiment` rows, `TrainConfig(task_type="
             "\"CAUSAL_LM\", rank=8, epochs=1, batch_size=8, max_length=64)`; time = the whole call (model load, "
             "one epoch, scoring 10 validation rows); tokens/s = the epoch's real prompt + completion + EOS tokens "
             "(`causal.verbalise` + `causal.encode_completions`, padding not counted) / time. Peak RSS = "
             "`ru_maxrss` of that process at its end, nothing subtracted (it includes the process baseline: "
             "Python, torch, the tokenizer and the model).",
             "",
             "| stage | dtype | time s | tokens/s | peak RSS MiB | bf16/fp32 time | bf16/fp32 tokens/s "
             "| bf16/fp32 peak RSS | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["ratio"]
        ratios = ("1 | 1 | 1" if r["dtype"] == "float32" else
                  f"{ratio['seconds']:.2f}× | {ratio['throughput']:.2f}× | {ratio['peak_rss_mib']:.2f}×")
        if r["stage"] == "stats":
            extra = f"{r['tokens']} tokens, {r['rows']} prompts; model load {r['load_s']:.1f} s"
        else:
            extra = (f"{r['tokens']} tokens, {r['rows']} rows; train loss {r['train_loss']:.3f}, "
                     f"val accuracy {r['val']:.2f}")
        times = ", ".join(f"{t:.1f}" for t in r["times"])
        lines.append(f"| {r['stage']} | {r['dtype']} | {r['seconds']:.1f} | {r['throughput']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {ratios} | {extra}; runs {times} s |")
    lines.append("")
    if "gram" in info:
        g = info["gram"]
        lines += [f"Gram matrices of the bf16 model against float32: relative Frobenius error max "
                  f"{g['max']:.2%}, median {g['median']:.2%} over the {g['inputs']} distinct inputs (q_proj and "
                  f"v_proj share theirs; same token count: {'yes' if info['same_tokens'] else 'NO'}); the library "
                  f"states < {TOLERANCE:.0%} on tiny models (tests/test_real_models.py).", ""]
    verdict = []
    for stage in ("stats", "train"):
        r = next((r for r in rows if r["stage"] == stage and r["dtype"] == "bfloat16"), None)
        if r:
            t = r["ratio"]["seconds"]
            verdict.append(f"{stage} {'slower' if t > 1 else 'faster'} in bf16 ({t:.2f}× the float32 time)")
    lines += [f"Measured: {'; '.join(verdict)}. What the numbers are for: bf16's point is the GPU path (half "
              "the weight memory, tensor-core GEMMs); this is the CPU baseline it is compared against, and the "
              "statistics error bf16 costs on a real model. `--gpu` (not run here, no GPU in this session) times "
              "a Llama-3.2-1B-shaped random model in bf16 on CUDA — statistics of q_proj, v_proj over 256 × 128 "
              "random tokens, the OSRM bases from them (`osrm_bases`: `torch.linalg.eigh` on the model's CUDA device), one PEFT LoRA (r = 16) "
              "AdamW step — and prints one JSON line with `torch.cuda.get_device_name()`." +
              (f" {note}" if note else ""), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- --gpu


class RandomTokens:
    """A stand-in tokenizer for ``collect_stats``: each "text" is a space-separated list of token ids."""

    def __call__(self, texts, pairs=None, truncation=True, max_length=None, padding=True, return_tensors="pt"):
        import torch
        from transformers import BatchEncoding

        ids = torch.tensor([[int(t) for t in text.split()][:max_length] for text in texts])   # equal lengths
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def gpu_bench(device: str = "cuda", samples: int = 256, length: int = 128, **shape) -> dict:
    """Stats, OSRM bases and one LoRA AdamW step of a random Llama-3.2-1B-shaped model in bf16 on ``device``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from orthomerge.osrm import osrm_bases
    from orthomerge.stats import collect_stats

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    dims = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, pad_token_id=0)
    config = LlamaConfig(**{**dims, **shape})
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.config.name_or_path = "llama-3.2-1b-shaped-random"
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, config.vocab_size, (samples, length), generator=g)
    texts = [" ".join(map(str, row.tolist())) for row in tokens]
    out = {"device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else device,
           "torch": torch.__version__, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
           "samples": samples, "length": length}
    collect_stats(model, RandomTokens(), texts[:16], TARGETS, max_length=length, batch_size=16, progress=False)
    sync()
    start = time.perf_counter()
    stats = collect_stats(model, RandomTokens(), texts, TARGETS, max_length=length, batch_size=16, progress=False)
    sync()
    out["stats_s"] = time.perf_counter() - start
    out["stats_tokens_per_s"] = stats.token_count / out["stats_s"]
    start = time.perf_counter()
    bases = osrm_bases(stats.modules, [stats, stats], rank=16, model=model)   # eigh on the model's CUDA device
    out["osrm_bases_s"] = time.perf_counter() - start
    out["osrm_modules"] = len(bases)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    peft_model.train()
    optimiser = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    batch = tokens[:8].to(device)

    def step():
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        return loss

    step()                                   # warm-up (kernels, optimiser state)
    sync()
    start = time.perf_counter()
    step()
    sync()
    out["train_step_s"] = time.perf_counter() - start
    out["train_step_batch"] = list(batch.shape)
    if torch.device(device).type == "cuda":
        out["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ---------------------------------------------------------------- entry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stats-rows", type=int, default=128, help="prompts for the statistics")
    p.add_argument("--train-rows", type=int, default=64, help="training rows (one epoch)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    p.add_argument("--note", default="", help="appended to the section's notes (e.g. the machine's load)")
    p.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    p.add_argument("--gpu", action="store_true", help="the CUDA figures of a Llama-3.2-1B-shaped model (JSON)")
    p.add_argument("--child", nargs=2, metavar=("STAGE", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--grams", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        stage, dtype = args.child
        if stage not in STAGES or dtype not in DTYPES:
            p.error(f"--child STAGE DTYPE: {STAGES} × {DTYPES}")
        print(json.dumps(child(stage, dtype, args)), flush=True)
        return
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine")
        print(json.dumps(gpu_bench()), flush=True)
        return
    rows, info = measure(args)
    command = ".venv/bin/python bench/bench_dtype.py" + "".join(
        f" --{k} {v}" for k, v in (("stats-rows", args.stats_rows), ("train-rows", args.train_rows),
                                   ("repeat", args.repeat), ("threads", args.threads))
        if v != p.get_default(k.replace("-", "_"))) + (" --write" if args.write else "")
    text = table(rows, info, command, args.note)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
