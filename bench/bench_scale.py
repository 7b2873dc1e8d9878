"""Scale: statistics and OSRM init of a Llama-3.2-1B-shaped model in bf16 on this CPU, per-layer figures
extrapolated to Llama-3-8B, a 2-process ``torchrun`` statistics run against one process, and (``--gpu``) the
prepared GPU check on a Llama-3-8B-shaped model.

    .venv/bin/python bench/bench_scale.py                  # CPU: measure, print the Markdown section
    .venv/bin/python bench/bench_scale.py --write          # also (re)write its section of BENCHMARKS.md
    python3 bench/bench_scale.py --gpu                     # the GPU check (Llama-3-8B shape, CUDA): JSON lines,
                                                           # and $OUT/gpu_check.json when $OUT is set
    .venv/bin/python bench/bench_scale.py --gpu --tiny     # the same steps on a tiny shape, on any device

The models are random (``LlamaForCausalLM`` from a config, bf16) and the data random word ids (``w3 w17 …``)
read through a word-level tokenizer saved with the model, so the real paths run unchanged (``load_model`` from a
folder, ``collect_stats``, ``orthomerge stats`` under ``torchrun``, ``init_peft_model_osrm``) and nothing is
downloaded. Each CPU measurement is a fresh process; its peak RSS is that process's ``ru_maxrss`` (the
wrapper's ``RUSAGE_CHILDREN``: for ``torchrun``, its largest worker). On the GPU machine, orthomerge needs
``pydantic`` (carry its wheel; see the device notes) and the repository on ``PYTHONPATH``.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
SECTION = "## Scale: statistics and OSRM init of Llama-shaped models (issue 13)"

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
QV = ["q_proj", "v_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def layer_params(shape: dict) -> int:
    """Weights of one decoder layer (attention + MLP), i.e. its forward FLOPs per token / 2."""
    d, f = shape["hidden_size"], shape["intermediate_size"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return d * (2 * d + 2 * kv) + 3 * d * f


# ---------------------------------------------------------------- building a random model folder and data


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer: ids 0–2 the special tokens (pad, unknown, end), id i ≥ 3 the word ``w{i}``.
    (Special tokens are matched inside words before pre-tokenising, so none may be a prefix of a word.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def random_llama(shape: dict, dtype: str = "bfloat16", device=None):
    """A random ``LlamaForCausalLM`` of ``shape`` (seed 0), built directly in ``dtype`` on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, pad_token_id=0, eos_token_id=2, bos_token_id=2, dtype=dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))   # build in the target dtype (half the memory of float32)
    try:
        torch.manual_seed(0)
        with torch.device(device or "cpu"):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)


def build_folder(folder: Path, shape: dict, dtype: str = "bfloat16") -> Path:
    """A random Llama causal LM (``shape``) saved in ``dtype`` with its word-level tokenizer."""
    if not (folder / "config.json").exists():
        random_llama(shape, dtype).save_pretrained(folder)
        word_tokenizer(shape["vocab_size"]).save_pretrained(folder)
    return folder


def random_texts(samples: int, length: int, vocab: int, seed: int) -> list[str]:
    """``samples`` rows of ``length`` random word ids (a "task": its own seed, its own rows)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (samples, length), generator=g)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def write_csv(path: Path, texts: list[str]) -> Path:
    path.write_text("text\n" + "\n".join(texts) + "\n")
    return path


# ---------------------------------------------------------------- CPU children (one measurement each)


def child_stats(args) -> dict:
    """Load the folder in bf16, time a plain forward and ``collect_stats`` over the same rows; save the stats."""
    import torch

    from orthomerge.models import load_model, load_tokenizer
    from orthomerge.stats import collect_stats, memory_plan, save_stats

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(args.folder, task_type="CAUSAL_LM", dtype="bfloat16", device="cpu")
    tokenizer = load_tokenizer(args.folder)
    load_s = time.perf_counter() - start
    texts = random_texts(args.samples, args.length, model.config.vocab_size, args.seed)
    targets = args.targets.split(",")
    out = {"load_s": load_s, "targets": targets, "samples": args.samples, "length": args.length,
           "plan_bytes": memory_plan(model, targets, args.storage).total, "storage": args.storage}
    if args.forward:
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(texts), args.batch_size):
                model(**tokenizer(texts[i:i + args.batch_size], return_tensors="pt"))
        out["forward_s"] = time.perf_counter() - start
    start = time.perf_counter()
    stats = collect_stats(model, tokenizer, texts, targets, max_length=args.length, batch_size=args.batch_size,
                          progress=False, storage=args.storage)
    out["stats_s"] = time.perf_counter() - start
    out["tokens"] = stats.token_count
    out["held_bytes"] = sum(t.numel() * t.element_size() for t in stats.tensors().values())
    if args.save:
        save_stats(stats, args.save)
    return out


def child_init(args) -> dict:
    """Load the folder, wrap it in a LoRA (r = 16 on q_proj, v_proj) and OSRM-initialise it from two
    statistics files; the solves timed alone too."""
    import torch

    from orthomerge.adapters import new_peft_model
    from orthomerge.models import load_model
    from orthomerge.osrm import init_peft_model_osrm, smallest_eigenvectors
    from orthomerge.stats import load_stats

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(args.folder, task_type="CAUSAL_LM", dtype="bfloat16", device="cpu")
    load_s = time.perf_counter() - start
    others = [load_stats(p) for p in args.others]
    peft_model = new_peft_model(model, QV, rank=16, alpha=32, task_type="CAUSAL_LM")
    start = time.perf_counter()
    meta = init_peft_model_osrm(peft_model, others)
    init_s = time.perf_counter() - start
    out = {"load_s": load_s, "init_s": init_s, "modules": len(peft_model.targeted_module_names),
           "distinct_inputs": len(others[0].groups), "variant": meta.get("variant")}
    if args.solve_width:   # one solve at another width (Llama-3-8B's q/v input): a random Gram of that size
        import numpy as np

        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.solve_width + 512, args.solve_width))
        gram = x.T @ x
        start = time.perf_counter()
        smallest_eigenvectors(gram, 16)
        out["solve_width"], out["solve_s"] = args.solve_width, time.perf_counter() - start
    return out


CHILDREN = {"stats": child_stats, "init": child_init}


def measured(cmd: list[str], env: dict | None = None) -> tuple[dict, float, float]:
    """Run ``cmd`` in a fresh wrapper process: (its last JSON line or {}, wall seconds, peak RSS MiB)."""
    wrapper = [sys.executable, str(Path(__file__).resolve()), "--wrap", "--", *cmd]
    done = subprocess.run(wrapper, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    if done.returncode or not lines:
        sys.exit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    outer = json.loads(lines[-1])
    inner = json.loads(lines[-2]) if len(lines) > 1 else {}
    return inner, outer["wall_s"], outer["peak_rss_mib"]


def wrap(cmd: list[str]) -> None:
    """Run ``cmd``, pass its output through, then print wall time and the largest descendant's peak RSS."""
    start = time.perf_counter()
    done = subprocess.run(cmd)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(done.returncode)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "peak_rss_mib": peak}), flush=True)


def child_cmd(kind: str, args, **extra) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--folder", str(args.folder),
           "--threads", str(args.threads), "--samples", str(args.samples), "--length", str(args.length),
           "--batch-size", str(args.batch_size)]
    for key, value in extra.items():
        if value is True:
            cmd.append(f"--{key.replace('_', '-')}")
        elif isinstance(value, list):
            cmd += [f"--{key.replace('_', '-')}", *map(str, value)]
        elif value not in (None, False):
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def grams_difference(a: Path, b: Path) -> float:
    """Largest relative Frobenius difference of Σxxᵀ between two statistics files of the same rows."""
    import torch

    from orthomerge.stats import load_stats

    x, y = load_stats(a), load_stats(b)
    if x.token_count != y.token_count or x.groups != y.groups:
        sys.exit(f"{a} and {b} describe different rows or inputs")
    return max(float(torch.linalg.norm(y.grams[k] - x.grams[k]) / torch.linalg.norm(x.grams[k])) for k in x.groups)


# ---------------------------------------------------------------- CPU: measure and tabulate


def measure_cpu(args) -> dict:
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), os.getloadavg()[0]
    t0 = time.perf_counter()
    args.folder = build_folder(work / "llama-1b-shaped", LLAMA_1B)
    build_s = time.perf_counter() - t0
    res: dict = {"build_s": build_s, "work": str(work)}
    vocab = LLAMA_1B["vocab_size"]
    # statistics of q_proj, v_proj: one process, 2 threads (a plain forward over the same rows for the ratio)
    res["stats_qv"], res["stats_qv_wall"], res["stats_qv_rss"] = measured(
        child_cmd("stats", args, targets="q_proj,v_proj", seed=0, forward=True, save=work / "t0.safetensors"))
    for seed in (1, 2):   # two more "tasks": the other tasks' statistics of the OSRM init
        measured(child_cmd("stats", args, targets="q_proj,v_proj", seed=seed, save=work / f"t{seed}.safetensors"))
    # the same rows as the first statistics, through the CLI: 1 process × 2 threads vs torchrun 2 × 1 thread
    csv = write_csv(work / "t0.csv", random_texts(args.samples, args.length, vocab, 0))
    cli = ["-m", "orthomerge.cli", "stats", "--model", str(args.folder), "--data", str(csv), "--targets",
           "q_proj,v_proj", "--dtype", "bfloat16", "--device", "cpu", "--task-type", "CAUSAL_LM", "--max-length",
           str(args.length), "--batch-size", str(args.batch_size), "--quiet", "--overwrite"]
    one = work / "cli1.safetensors"
    _, res["cli_one_wall"], res["cli_one_rss"] = measured(
        [sys.executable, *cli, "--out", str(one)], env={"OMP_NUM_THREADS": "2"})
    two = work / "cli2.safetensors"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29500 + os.getpid() % 1000)]
    _, res["cli_two_wall"], res["cli_two_rss"] = measured(
        [*torchrun, *cli, "--out", str(two)], env={"OMP_NUM_THREADS": "1"})
    res["torchrun_difference"] = grams_difference(one, two)
    res["same_batches_difference"] = grams_difference(one, work / "t0.safetensors")   # in-process, same batches
    # all-linear statistics, float32 accumulators
    res["stats_all"], res["stats_all_wall"], res["stats_all_rss"] = measured(
        child_cmd("stats", args, targets=",".join(ALL_LINEAR), seed=0, storage="float32",
                  samples_override=args.all_linear_samples))
    # OSRM init of q_proj, v_proj from two other tasks' statistics, and one solve at d = 4096
    res["init"], res["init_wall"], res["init_rss"] = measured(
        child_cmd("init", args, others=[work / "t1.safetensors", work / "t2.safetensors"],
                  solve_width=LLAMA_8B["hidden_size"]))
    res["plans_8b"] = plans_8b()
    res["env"] = (f"{platform.machine()} with {os.cpu_count()} cores, torch {torch.__version__}, "
                  f"{args.threads} thread(s) per process")
    res["load"] = (load, os.getloadavg()[0])
    res["total_s"] = time.perf_counter() - started
    return res


def plans_8b() -> dict:
    """Exact statistics plans of Llama-3-8B (from its shapes on the meta device, no weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orthomerge.stats import memory_plan

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_8B))
    model.config.name_or_path = "llama-3-8b-shaped"
    return {f"{name} {storage}": memory_plan(model, targets, storage).total
            for name, targets in (("q,v", QV), ("all-linear", ALL_LINEAR)) for storage in ("float64", "float32")}


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def section(res: dict, command: str, note: str = "") -> str:
    s, a, i = res["stats_qv"], res["stats_all"], res["init"]
    layers1, layers8 = LLAMA_1B["num_hidden_layers"], LLAMA_8B["num_hidden_layers"]
    d1, d8 = LLAMA_1B["hidden_size"], LLAMA_8B["hidden_size"]
    tokens = s["tokens"]
    forward_layer = s["forward_s"] / layers1 / tokens
    gram_layer = max(s["stats_s"] - s["forward_s"], 0.0) / layers1 / tokens
    scale_fwd = layer_params(LLAMA_8B) / layer_params(LLAMA_1B)
    scale_gram = (d8 / d1) ** 2
    est_stats_8b = layers8 * (forward_layer * scale_fwd + gram_layer * scale_gram)   # s per token
    solve_layer_1b = i["init_s"] / i["distinct_inputs"]
    est_solve_down = i["solve_s"] * (LLAMA_8B["intermediate_size"] / d8) ** 3
    plans = res["plans_8b"]
    lines = [SECTION, "",
             f"Generated by `{command}` on {res['env']}; 1-min load average {res['load'][0]:.2f} at the start, "
             f"{res['load'][1]:.2f} at the end; total {res['total_s'] / 60:.1f} min (building and saving the "
             f"random model: {res['build_s']:.0f} s). Model: a random `LlamaForCausalLM` of Llama-3.2-1B's shape "
             f"(hidden {d1}, MLP {LLAMA_1B['intermediate_size']}, {layers1} layers, GQA 32/8, vocab 128256; "
             "1.24 B parameters) saved in bfloat16 and loaded with `load_model(..., dtype=\"bfloat16\")`; data: "
             f"{s['samples']} rows × {s['length']} random word ids per task (no padding), batch {s['batch']}. "
             "Each row below is a fresh process; peak RSS includes the process baseline "
             "(Python, torch, the 2.5 GB model).", "",
             "| step (Llama-3.2-1B shape, bf16, CPU) | time | tokens | peak RSS | statistics held |",
             "|---|---|---|---|---|",
             f"| plain forward, no hooks | {s['forward_s']:.1f} s | {tokens} | | |",
             f"| `collect_stats` q_proj, v_proj (float64 sums) | {s['stats_s']:.1f} s ({s['stats_s'] / s['forward_s']:.2f}× "
             f"the forward) | {tokens} | {res['stats_qv_rss'] / 1024:.1f} GiB | {gib(s['held_bytes'])} (plan "
             f"{gib(s['plan_bytes'])}) |",
             f"| `collect_stats` all-linear, float32 accumulators | {a['stats_s']:.1f} s | {a['tokens']} | "
             f"{res['stats_all_rss'] / 1024:.1f} GiB | {gib(a['held_bytes'])} (plan {gib(a['plan_bytes'])}) |",
             f"| `orthomerge stats` (CLI, q_proj, v_proj), 1 process × 2 threads | {res['cli_one_wall']:.1f} s "
             f"(wall, with loading) | {tokens} | {res['cli_one_rss'] / 1024:.1f} GiB | |",
             f"| the same under `torchrun --nproc_per_node 2`, 1 thread each | {res['cli_two_wall']:.1f} s "
             f"({res['cli_two_wall'] / res['cli_one_wall']:.2f}× one process) | {tokens} | "
             f"{res['cli_two_rss'] / 1024:.1f} GiB per process | |",
             f"| OSRM init of q_proj, v_proj (r = 16, {i['distinct_inputs']} solves at d = {d1}, float64) | "
             f"{i['init_s']:.1f} s ({solve_layer_1b:.2f} s per layer) | | {res['init_rss'] / 1024:.1f} GiB | |",
             f"| one OSRM solve at d = {i['solve_width']} (r = 16, `auto` solver) | {i['solve_s']:.1f} s | | | |",
             "",
             f"Exactness: the 2-process statistics differ from the 1-process ones by at most "
             f"{res['torchrun_difference']:.1e} (relative Frobenius, per distinct input; the CLI run and the "
             f"in-process run with the same batches differ by {res['same_batches_difference']:.1e}). Each "
             "process sums other batches (rows k, k + 2, …), so the float32 per-batch products round "
             "differently; the all-reduce itself adds the float64 sums exactly (tests/test_stats.py: two gloo "
             "processes equal one).", "",
             "Extrapolated to Llama-3-8B (hidden 4096, MLP 14336, 32 layers) on this CPU, from the per-layer "
             "figures above (forward time × the layer's weight ratio "
             f"{scale_fwd:.2f}, Gram time × (4096/2048)² = {scale_gram:.0f}, solves × (d/d₀)³); plans exact from "
             "the shapes (`stats.memory_plan`):", "",
             "| Llama-3-8B | figure | how |",
             "|---|---|---|",
             f"| statistics q_proj, v_proj | {est_stats_8b * 1000:.1f} ms per token ({1 / est_stats_8b:.0f} tokens/s) "
             "| extrapolated |",
             f"| statistics plan q, v | {gib(plans['q,v float64'])} float64, {gib(plans['q,v float32'])} float32 | exact |",
             f"| statistics plan all-linear | {gib(plans['all-linear float64'])} float64, "
             f"{gib(plans['all-linear float32'])} float32 | exact (upper bound: q/k/v and gate/up are stored once) |",
             f"| OSRM init q_proj, v_proj (32 solves at d = 4096) | {32 * i['solve_s'] / 60:.1f} min | "
             "measured solve × 32 |",
             f"| one solve at d = 14336 (down_proj input) | {est_solve_down / 60:.0f} min | extrapolated (d³) |",
             ]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- --gpu: the prepared check


def gpu_check(args) -> dict:
    """Llama-3-8B-shaped random model in bf16 on ``args.device``: statistics of q_proj, v_proj and of every
    linear module, OSRM init, one Trainer epoch of a small task, a merge of 8 random r = 16 all-linear adapters."""
    import torch

    from orthomerge.adapters import LoraAdapter, new_peft_model
    from orthomerge.config import TrainConfig
    from orthomerge.merge import merge_adapters
    from orthomerge.osrm import init_peft_model_osrm
    from orthomerge.stats import collect_stats, memory_plan
    from orthomerge.tasks import Split, Task
    from orthomerge.train import build_trainer, training_arguments

    shape = TINY if args.tiny else LLAMA_8B
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    out: dict = {"shape": "tiny" if args.tiny else "llama-3-8b", "torch": torch.__version__,
                 "device": torch.cuda.get_device_name(device) if cuda else str(device)}

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def report(step: str, **values):
        sync()
        if cuda:
            values["max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        out[step] = values
        print(json.dumps({step: values}), flush=True)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(out, indent=1))

    t = time.perf_counter()
    tokenizer = word_tokenizer(shape["vocab_size"])
    model = random_llama(shape, "bfloat16", device)
    model.config.name_or_path = out["shape"]
    report("build", seconds=time.perf_counter() - t, params_b=sum(p.numel() for p in model.parameters()) / 1e9)

    samples, length = (16, 32) if args.tiny else (args.samples, args.length)
    texts = [random_texts(samples, length, shape["vocab_size"], seed) for seed in range(3)]
    for name, targets, storage in (("stats_qv", QV, "float64"), ("stats_all_linear", ALL_LINEAR, "float32")):
        plan = memory_plan(model, targets, storage)
        t = time.perf_counter()
        stats = collect_stats(model, tokenizer, texts[0], targets, max_length=length, batch_size=8,
                              progress=False, storage=storage)
        seconds = time.perf_counter() - t
        report(name, seconds=seconds, tokens=stats.token_count, tokens_per_s=stats.token_count / seconds,
               plan_gib=plan.total / 2**30, distinct_inputs=len(stats.groups))
        del stats
    others = [collect_stats(model, tokenizer, x, QV, max_length=length, batch_size=8, progress=False)
              for x in texts[1:]]
    peft_model = new_peft_model(model, QV, rank=16, alpha=32, task_type="CAUSAL_LM")
    t = time.perf_counter()
    init_peft_model_osrm(peft_model, others)
    report("osrm_init_qv", seconds=time.perf_counter() - t, modules=len(peft_model.targeted_module_names))
    del others

    rows = 64 if not args.tiny else 16
    words = random_texts(rows, 24, shape["vocab_size"], 3)
    labels = [i % 2 for i in range(rows)]
    task = Task("random", ["w5", "w6"], "accuracy", Split(words, labels), Split(words[:8], labels[:8]),
                Split(words[:8], labels[:8]))
    config = TrainConfig(task_type="CAUSAL_LM", rank=16, alpha=32, targets=QV, epochs=1, batch_size=8,
                         max_length=32, lr=1e-4)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(peft_model, tokenizer, task, config, training_arguments(config, scratch, False, device))
        t = time.perf_counter()
        trainer.train()
        report("trainer_epoch", seconds=time.perf_counter() - t, rows=rows, steps=trainer.state.global_step)
    base = peft_model.unload()   # the base model again, for the merges' validation
    del peft_model, trainer

    layers = dict(base.named_modules())
    names = [n for n, m in layers.items() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in ALL_LINEAR]
    g = torch.Generator().manual_seed(0)
    adapters = []
    for k in range(8):
        A = {n: torch.randn(16, layers[n].in_features, generator=g) / layers[n].in_features ** 0.5 for n in names}
        B = {n: torch.randn(layers[n].out_features, 16, generator=g) * 1e-3 for n in names}
        adapters.append(LoraAdapter(A=A, B=B, scaling={n: 2.0 for n in names},
                                    config={"task_type": "CAUSAL_LM", "base_model_name_or_path": out["shape"]}))
    for method in ("task_arithmetic", "ties", "tsv"):
        t = time.perf_counter()
        result = merge_adapters(adapters, method=method, model=base, device=device)
        report(f"merge_8x_r16_all_linear_{method}", seconds=time.perf_counter() - t, modules=len(names),
               rel_error=result.report["total"]["rel_error"])
    return out


# ---------------------------------------------------------------- entry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16, help="rows per task")
    p.add_argument("--length", type=int, default=128, help="tokens per row")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--all-linear-samples", type=int, default=8, help="rows for the all-linear statistics")
    p.add_argument("--threads", type=int, default=2, help="torch threads per (single) process")
    p.add_argument("--work", default=None, help="folder for the model and statistics (default: a temp folder)")
    p.add_argument("--note", default="")
    p.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    p.add_argument("--gpu", action="store_true", help="the prepared GPU check (Llama-3-8B shape)")
    p.add_argument("--tiny", action="store_true", help="--gpu on a tiny shape (checks the script anywhere)")
    p.add_argument("--device", default="cuda", help="--gpu: where it runs")
    p.add_argument("--wrap", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--targets", default="q_proj,v_proj", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--storage", default="float64", help=argparse.SUPPRESS)
    p.add_argument("--forward", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--others", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--solve-width", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--samples-override", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.wrap:
        wrap(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
        return
    if args.child:
        if args.samples_override:
            args.samples = args.samples_override
        print(json.dumps({**CHILDREN[args.child](args), "batch": args.batch_size}), flush=True)
        return
    if args.gpu:
        import torch

        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device here (torch.cuda.is_available() is False); add --tiny --device cpu "
                     "to check the script on the CPU")
        print(json.dumps(gpu_check(args)), flush=True)
        return
    res = measure_cpu(args)
    command = ".venv/bin/python bench/bench_scale.py" + "".join(
        f" --{k} {getattr(args, k.replace('-', '_'))}" for k in ("samples", "length", "batch-size",
                                                                  "all-linear-samples", "threads")
        if getattr(args, k.replace("-", "_")) != p.get_default(k.replace("-", "_"))) + (" --write" if args.write else "")
    text = section(res, command, args.note)
    print(text)
    if args.write:
        from benchmarks_md import write_section

        write_section(text)


if __name__ == "__main__":
    main()
