"""The ``orthomerge`` command: a thin layer over the library, one module per subcommand.

Each module in :mod:`orthomerge.commands` has ``register(subparsers)``, which adds its parser and sets
``func``. User errors (:class:`OrthomergeError`) are printed as one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import OrthomergeError

COMMAND_MODULES = ["stats", "osrm", "merge", "train", "eval", "experiment", "safety"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orthomerge",
        description="Mergeable LoRA adapters: activation statistics, OSRM init, training, merging, evaluation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"orthomerge.commands.{name}").register(sub)
    return parser


def _console_notes() -> logging.Handler:
    """Show the library's warnings (``logging.getLogger("orthomerge")``) as ``orthomerge: note: …`` lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("orthomerge: note: %(message)s"))
    logging.getLogger("orthomerge").addHandler(handler)
    return handler


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv   # what was asked, for outputs that record how they were made
    handler = _console_notes()
    try:
        args.func(args)
    except OrthomergeError as err:
        print(f"orthomerge: error: {err}", file=sys.stderr)
        return 2
    finally:
        logging.getLogger("orthomerge").removeHandler(handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
