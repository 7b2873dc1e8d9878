"""CLI subcommands; each module exposes ``register(subparsers)``."""
from __future__ import annotations

import argparse

OVERWRITE_HELP = ("replace an earlier orthomerge output at --out (never a folder orthomerge did not write, "
                  "one that holds an input, or the working directory)")


def add_common(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """Options most subcommands share: the base model and ``--quiet``."""
    if model:
        parser.add_argument("--model", default="minilm",
                            help="bundled alias (minilm, smollm2) or a local Hugging Face model folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_output(parser: argparse.ArgumentParser, help: str, *, required: bool = True, is_file: bool = False,
               default: str | None = None) -> None:
    """``--out`` and ``--overwrite``; :func:`checked_out` applies the rules of :mod:`orthomerge.outputs`."""
    parser.add_argument("--out", required=required, default=default, help=help)
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.set_defaults(out_is_file=is_file)


def checked_out(args: argparse.Namespace, inputs=(), resume: bool = False):
    """Check ``--out`` before any work (one-line refusal), with the run's ``inputs``."""
    from ..outputs import check_output

    return check_output(args.out, overwrite=args.overwrite, inputs=[i for i in inputs if i],
                        is_file=args.out_is_file, resume=resume)
