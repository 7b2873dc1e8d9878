"""``orthomerge merge``: merge several task LoRAs on one base into one result (see orthomerge.merge)."""
from __future__ import annotations

import argparse
import json

from . import OVERWRITE_HELP, add_common, checked_out


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge", help="merge LoRA adapters (task arithmetic, TIES, DARE, TSV, Iso, RegMean, EMR, Core/KnOTS, "
                      "continual, DO-Merging, DOGE, Fisher, AdaMerging, search)",
        description="Merge task LoRAs on one base model. Output: OUT/ = merged LoRA (PEFT folder, no head), "
                    "OUT/tasks/<name>/ = merged LoRA + that task's head, OUT/merge_report.json.")
    what = p.add_argument_group("what to merge")
    what.add_argument("--method", help="registered method name (see --list-methods)")
    what.add_argument("--adapters", nargs="+", metavar="DIR", help="PEFT adapter folders")
    what.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per adapter (default 1)")
    what.add_argument("--config", metavar="YAML", help="mergekit-style recipe (method, adapters, parameters, output)")
    what.add_argument("--list-methods", action="store_true", help="print the registered methods and exit")
    hyper = p.add_argument_group("hyper-parameters")
    hyper.add_argument("--scale", type=float, help="global coefficient λ (task arithmetic, TIES, TSV α, Iso λ, …)")
    hyper.add_argument("--density", type=float, help="fraction kept: TIES/magnitude top-k, DARE 1 − p")
    hyper.add_argument("--space", metavar="SPACE",
                       help="pick the variant of --method in this space: factored, dense, core or knots (ties + core → core_ties)")
    hyper.add_argument("--stats", nargs="+", metavar="FILE", help="statistics per adapter (regmean)")
    hyper.add_argument("--data", nargs="+", metavar="TASK",
                       help="task data per adapter for data-driven methods (fisher, adamerging, search): a bundled "
                            "task name or a tasks YAML (file.yaml, or file.yaml#name); needs --model")
    hyper.add_argument("--seed", type=int, default=0, help="seed of random rules (DARE); default 0")
    hyper.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any other method parameter (JSON or text; typed and checked by the method's signature, see "
                            "--list-methods), e.g. --set sign=frequency --set normalize=weight")
    out = p.add_argument_group("output")
    out.add_argument("--out", help="output folder (written atomically)")
    out.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    out.add_argument("--rank", type=int, help="re-compress every module to rank k (exact SVD from factors; "
                     "dense results default to Σr); the error is reported")
    out.add_argument("--dense", action="store_true", help="write full merged model folders instead of a LoRA")
    out.add_argument("--svd", default="auto",
                     help="SVD for re-compressing dense results: auto (exact up to 2048², randomized above), exact or randomized")
    out.add_argument("--device", default="cpu",
                     help="where the rules and the data-driven methods' model run: cpu (default), cuda, auto")
    out.add_argument("--threads", type=int, default=None,
                     help="torch threads while merging (default $ORTHOMERGE_THREADS or 1: many small "
                          "decompositions run faster single-threaded; 0 = torch's default)")
    add_common(p)
    p.set_defaults(func=run, model=None, out_is_file=False)


def _device(text: str):
    from ..models import resolve_device

    return resolve_device(text)


def run(args: argparse.Namespace) -> None:
    from ..errors import OrthomergeError
    from ..merge import list_methods, merge_adapters, run_recipe

    if args.list_methods:
        print("\n".join(list_methods()))
        return
    if args.config:
        if args.method or args.adapters:
            raise OrthomergeError("--config: give method and adapters in the recipe, not on the command line")
        result = run_recipe(args.config, out=args.out, progress=not args.quiet, threads=args.threads,
                            overwrite=args.overwrite)
    else:
        if not args.method or not args.adapters or not args.out:
            raise OrthomergeError("merge needs --method, --adapters and --out (or --config recipe.yaml)")
        checked_out(args, [*args.adapters, *(args.stats or []), *(args.data or [])])
        params = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise OrthomergeError(f"--set {item!r}: expected KEY=VALUE")
            params[key.strip()] = _value(value.strip())
        if args.scale is not None:
            params["scale"] = args.scale
        if args.density is not None:
            params["density"] = args.density
        result = merge_adapters(args.adapters, method=args.method, weights=args.weights, space=args.space,
                                rank=args.rank, dense=args.dense, model=args.model, stats=args.stats,
                                seed=args.seed, svd=args.svd, progress=not args.quiet, threads=args.threads,
                                data=args.data, device=_device(args.device), **params)
        result.save(args.out, overwrite=args.overwrite)
    total = result.report["total"]
    print(f"{result.method}: wrote {result.path} (total re-compression error {total['rel_error']:.3g}, "
          f"{result.report['timing']['merge_s']:.2f} s)")
    if result.report.get("summary"):   # a method's own one-line outcome (e.g. search's winner)
        print(result.report["summary"])
