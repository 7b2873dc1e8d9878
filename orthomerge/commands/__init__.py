"""CLI subcommands; each module exposes ``register(subparsers)``."""
from __future__ import annotations

import argparse


def add_common(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """Options most subcommands share: the base model and ``--quiet``."""
    if model:
        parser.add_argument("--model", default="minilm",
                            help="bundled alias (minilm, smollm2) or a local Hugging Face model folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
