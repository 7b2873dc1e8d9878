"""``orthomerge safety``: refusal and over-refusal of a causal LM, its adapters and its merges."""
from __future__ import annotations

import argparse

from . import add_common, add_output, checked_out


DETECTORS = ("phrase", "likelihood", "both")   # as orthomerge.safety.DETECTORS (not imported: torch is slow)
PARTS = ("all", "train", "validation", "test")  # as orthomerge.safety.PARTS


def register(sub) -> None:
    p = sub.add_parser(
        "safety", help="refusal rate on harmful requests and over-refusal on matched harmless ones "
                       "(base, adapters, merges of a causal LM), with 95%% intervals",
        description="Safety check of a causal LM: for the base model and for W0 + dW of every adapter and "
                    "merged adapter, the refusal rate on the bundled harmful requests and the over-refusal rate "
                    "on their harmless look-alikes. Output: OUT/report.json, OUT/safety.md, OUT/safety.png.")
    p.add_argument("--model", default="smollm2",
                   help="bundled alias (smollm2) or a local causal-LM folder; default smollm2")
    p.add_argument("--adapters", nargs="+", default=[], metavar="DIR", help="LoRA adapter folders (one task each)")
    p.add_argument("--merged", nargs="+", default=[], metavar="DIR",
                   help="merged LoRA folders, as `orthomerge merge` writes them")
    p.add_argument("--limit", type=int, default=None,
                   help="first N prompts of each set, round-robin over categories (default: all)")
    p.add_argument("--part", choices=PARTS, default="all",
                   help="part of each prompt set: all, or train / validation / test (rows 1-2 / 3 / 4-5 of every "
                        "five per category; test is held out from the bundled misaligned and refusal tasks); "
                        "default all")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy reply length judged (default 32)")
    p.add_argument("--detector", choices=DETECTORS, default=None,
                   help="refusal judge: phrase (on the reply), likelihood (refusal vs compliance prefix), "
                        "both (either one); default phrase (README: why)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--harmful", default=None, metavar="JSONL", help="own harmful prompts (id, prompt, category)")
    p.add_argument("--harmless", default=None, metavar="JSONL", help="own harmless prompts (id, prompt, category)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default cpu)")
    add_output(p, "output folder, written atomically (default runs/safety)", required=False, default="runs/safety")
    add_common(p, model=False)
    p.set_defaults(func=run)


def _names(paths: list[str], taken: set[str]) -> list[str]:
    """Folder names as model names, made unique (``name``, ``name-2``, …)."""
    from pathlib import Path

    names = []
    for path in paths:
        base = Path(path).name or str(path)
        name, k = base, 2
        while name in taken:
            name, k = f"{base}-{k}", k + 1
        taken.add(name)
        names.append(name)
    return names


def run(args: argparse.Namespace) -> None:
    import json
    import shlex

    from ..adapters import load_adapter
    from ..errors import OrthomergeError
    from ..outputs import atomic_dir
    from ..safety import DEFAULT_DETECTOR, compare_safety, render_markdown, render_plot

    checked_out(args, [*(args.adapters or []), *(args.merged or []), args.harmful, args.harmless])
    if args.limit is not None and args.limit < 1:
        raise OrthomergeError(f"--limit must be ≥ 1, got {args.limit}")
    variants, kinds = {}, {}
    taken = {"base"}
    for kind, paths in (("adapter", args.adapters), ("merge", args.merged)):
        for name, path in zip(_names(paths, taken), paths):
            variants[name] = load_adapter(path)   # reads and checks every folder before any generation
            kinds[name] = kind
    result = compare_safety(args.model, variants, kinds=kinds, device=args.device, progress=not args.quiet,
                            harmful=args.harmful, harmless=args.harmless, limit=args.limit, part=args.part,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            detector=args.detector or DEFAULT_DETECTOR)
    result["command"] = "orthomerge " + shlex.join(getattr(args, "argv", []) or ["safety"])
    with atomic_dir(args.out) as tmp:
        (tmp / "report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        (tmp / "safety.md").write_text(render_markdown(result))
        render_plot(result, tmp / "safety.png")
    if not args.quiet:
        for m in result["models"]:
            h, s = m["harmful"], m["harmless"]
            print(f"{m['name']:>16}: refusal {h['refused']}/{h['n']} ({100 * h['rate']:.1f}%), "
                  f"over-refusal {s['refused']}/{s['n']} ({100 * s['rate']:.1f}%)")
        print(f"wrote {args.out}/report.json, safety.md, safety.png ({result['seconds']:.0f} s)")
