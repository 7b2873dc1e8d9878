"""CLI subcommands; each module exposes ``register(subparsers)``."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from ..config import DEFAULT_DEVICE, DEFAULT_DTYPE, DTYPE_CHOICES, MODEL, TEST_SIZE, TRAIN_SIZE, VAL_SIZE

OVERWRITE_HELP = ("replace an earlier orthomerge output at --out (never a folder orthomerge did not write, "
                  "one that holds an input, or the working directory)")


def add_common(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """Options most subcommands share: the base model and ``--quiet``."""
    if model:
        parser.add_argument("--model", default=MODEL,
                            help="bundled alias (minilm, smollm2), a local Hugging Face model folder, or a Hub "
                                 "repo id owner/name[@revision] (from the cache when offline)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_placement(parser: argparse.ArgumentParser, task_type: bool = True) -> None:
    """``--device``, ``--dtype`` and (unless the command has its own) ``--task-type``: how the base is loaded."""
    parser.add_argument("--device", default=DEFAULT_DEVICE,
                        help="cuda, mps, cpu, cuda:1, … (default auto: cuda if available, else mps, else cpu)")
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_CHOICES,
                        help="the base model's precision (default auto: the checkpoint's own dtype)")
    if task_type:
        parser.add_argument("--task-type", default=None, type=str.upper,
                            help="PEFT task type the base is loaded as: SEQ_CLS, CAUSAL_LM, TOKEN_CLS, "
                                 "SEQ_2_SEQ_LM, FEATURE_EXTRACTION (default: the adapter's, else SEQ_CLS)")


def placement(args: argparse.Namespace, task_type: str | None = None) -> dict:
    """``load_model`` keyword arguments from :func:`add_placement`'s options."""
    from ..models import resolve_device

    return {"task_type": task_type or getattr(args, "task_type", None) or "SEQ_CLS",
            "device": resolve_device(args.device), "dtype": args.dtype}


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


def add_dataclass_options(parser: argparse.ArgumentParser, cls, only: tuple[str, ...] | None = None,
                          unset: bool = False) -> None:
    """One ``--field-name`` option per field of the dataclass ``cls`` (or the fields named in ``only``):
    default (and so type) from the field, help text and choices from its metadata
    (:func:`orthomerge.config.option`). A list field takes one comma-separated value and stays a string
    until the command parses it. ``unset``: an option not given is absent from the parsed arguments (so
    that a preset can fill it), its help still showing the field's default."""
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        kwargs = {"default": default, "help": f"{f.metadata['help']} (default {shown})".replace("%", "%%")}
        if isinstance(default, bool):   # --name / --no-name
            kwargs["action"] = argparse.BooleanOptionalAction
        elif not isinstance(default, list):
            kwargs["type"] = f.metadata.get("parse", type(default))
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if unset:
            kwargs["default"] = argparse.SUPPRESS
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def dataclass_from_args(cls, args: argparse.Namespace, **values):
    """``cls`` built from the options :func:`add_dataclass_options` added (``values`` take precedence)."""
    return cls(**{**{f.name: getattr(args, f.name) for f in fields(cls)}, **values})


def add_task_options(parser: argparse.ArgumentParser) -> None:
    """``--tasks`` (a tasks.yaml) and the split sizes."""
    parser.add_argument("--tasks", default=None, help="tasks.yaml with user tasks (default: the bundled suite)")
    for option, split, default in (("train", "training", TRAIN_SIZE), ("val", "validation", VAL_SIZE),
                                   ("test", "test", TEST_SIZE)):
        parser.add_argument(f"--{option}-size", type=int, default=default,
                            help=f"rows of each task's {split} split (default {default})")


def named_tasks(args: argparse.Namespace, names: list[str]):
    """(the pool of tasks for OSRM's "other tasks", the named tasks): --tasks YAML or the bundled suite."""
    from ..errors import OrthomergeError
    from ..tasks import load_task, load_tasks

    sizes = dict(train_size=args.train_size, val_size=args.val_size, test_size=args.test_size)
    pool = load_tasks(args.tasks, **sizes)
    by_name = {t.name: t for t in pool}
    for name in names:
        if name not in by_name:
            if args.tasks:
                raise OrthomergeError(f"{args.tasks}: no task named {name!r}")
            by_name[name] = load_task(name, **sizes)
            pool.append(by_name[name])
    return pool, [by_name[n] for n in names]
