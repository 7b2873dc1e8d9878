"""Trust: orthomerge never loses data, never merges silently wrong, and refuses in one clear line.

An independent, table-driven oracle written from the contract (not from the implementation):

* every refusal row runs the CLI in-process (``orthomerge.cli.main``) and asserts exit 2, exactly one
  non-empty stderr line starting ``orthomerge: error: `` that names the offending path (or what the row
  says), no traceback, and that NOTHING under the test's working folder changed (:func:`tree_state`);
* merge results are checked against oracles built from PEFT alone (``merge_and_unload`` per adapter, the
  weight differences summed), never from orthomerge's own code.

Tiny random models only (hidden 32, 2 layers), built from configs; nothing is downloaded.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib
import json
import logging
import math
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  (configure its logging handler once, on the session's stderr)
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging
from trust_fixtures import (adapter_modules, bert_inputs, config_only, edit_config, llama_inputs, load_base,
                            make_lora, oracle_model, outputs, peft_factor_deltas, peft_model, pissa_converted,
                            rel, save_bert, save_llama)

from orthomerge import cli

hf_logging.get_verbosity()

PREFIX = "orthomerge: error: "
REPO = Path(__file__).resolve().parents[1]
SMALL_TRAIN = ["--train-size", "8", "--val-size", "4", "--test-size", "4", "--epochs", "1", "--rank", "2"]


# ---------------------------------------------------------------- the disk checksum


def tree_state(root: Path) -> dict:
    """Everything under ``root``: relative file path → (sha256 of bytes, mode); relative dir → mode.

    Two equal states mean nothing on disk changed (no file written, removed, edited or re-permissioned,
    no folder created or removed).
    """
    root = Path(root)
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        state[("dir", d.relative_to(root).as_posix())] = stat.S_IMODE(d.lstat().st_mode)
        for name in dirnames + filenames:
            p = d / name
            rel_p = p.relative_to(root).as_posix()
            if p.is_symlink():
                state[("link", rel_p)] = os.readlink(p)
            elif p.is_file():
                state[("file", rel_p)] = (hashlib.sha256(p.read_bytes()).hexdigest(),
                                          stat.S_IMODE(p.lstat().st_mode))
    return state


def state_diff(before: dict, after: dict) -> list[str]:
    out = [f"removed {k}" for k in before if k not in after]
    out += [f"added {k}" for k in after if k not in before]
    out += [f"changed {k}" for k in before if k in after and before[k] != after[k]]
    return sorted(out)


# ---------------------------------------------------------------- running the CLI


@dataclass
class Run:
    code: int | None
    out: str
    err: str
    tb: str = ""      # a traceback, if cli.main raised instead of returning

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run_cli(capsys, argv, cwd: Path | None = None) -> Run:
    """``orthomerge.cli.main(argv)`` in-process (optionally in ``cwd``); output captured."""
    capsys.readouterr()
    old = os.getcwd()
    tb, code = "", None
    try:
        if cwd is not None:
            os.chdir(cwd)
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:   # argparse
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:           # noqa: BLE001 — a traceback is exactly what the contract forbids
        tb = traceback.format_exc()
    finally:
        os.chdir(old)
    cap = capsys.readouterr()
    return Run(code, cap.out, cap.err, tb)


def names(p) -> list[str]:
    """Ways a message may name ``p``: as given, its name, its absolute path."""
    p = Path(p)
    return [str(p), p.name, str(p.resolve())] if p.name else [str(p), str(p.resolve())]


def assert_refused(run: Run, needles: list[list[str]], before: dict, after: dict) -> None:
    assert not run.tb, f"traceback instead of a one-line error:\n{run.tb}"
    assert run.code == 2, f"exit {run.code}, expected 2; stderr={run.err!r} stdout={run.out[-500:]!r}"
    lines = run.err_lines
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}: {run.err!r}"
    line = lines[0]
    assert line.startswith(PREFIX), line
    assert "Traceback" not in run.err + run.out
    for group in needles:
        assert any(str(n).lower() in line.lower() for n in group), f"{line!r} names none of {group}"
    diff = state_diff(before, after)
    assert not diff, f"disk changed by a refused command: {diff[:8]}"


def assert_ok(run: Run) -> None:
    assert not run.tb, f"traceback:\n{run.tb}"
    assert run.code == 0, f"exit {run.code}; stderr={run.err!r}"
    assert "Traceback" not in run.err


def merge_argv(method, adapters, out, *extra) -> list:
    return ["merge", "--method", method, "--adapters", *adapters, "--out", out, "--quiet", *extra]


def strict_json(path: Path) -> dict:
    """JSON that must not contain NaN / Infinity."""
    def bad(token):
        raise AssertionError(f"{path}: non-finite number {token} in JSON")
    return json.loads(Path(path).read_text(), parse_constant=bad)


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in Path(out).parent.iterdir() if p.name.startswith(f".{Path(out).name}."))


# ---------------------------------------------------------------- shared models and adapters


@pytest.fixture(scope="session")
def stock(tmp_path_factory, tiny_bert, tiny_llama):
    """Base-model folders and PEFT adapters, made once; tests copy what they use into their tmp_path."""
    root = tmp_path_factory.mktemp("trust_stock")
    m = SimpleNamespace(bert=Path(tiny_bert), llama_cls=Path(tiny_llama))
    m.bert48 = save_bert(root / "bert48", hidden=48, labels=2, seed=1)
    m.bare = save_bert(root / "bare_bert", bare=True, seed=2)
    m.cfg_only = config_only(tiny_bert, root / "bert_config_only")
    m.llama_lm = save_llama(root / "llama_lm", causal=True, seed=3)
    m.llama_notok = save_llama(root / "llama_notok", tokenizer=False, pad=False, seed=4)
    ad = root / "adapters"
    a = {}
    a["alpha_task"] = make_lora(m.bert, ad / "alpha_task", r=4, alpha=8, seed=1)
    a["beta_task"] = make_lora(m.bert, ad / "beta_task", r=2, alpha=3, seed=2)
    a["old_one"] = make_lora(m.bert, ad / "old_one", r=2, alpha=2, seed=21)
    a["old_two"] = make_lora(m.bert, ad / "old_two", r=2, alpha=2, seed=22)
    a["query_only"] = make_lora(m.bert, ad / "query_only", targets=("query",), seed=23)
    a["gamma_wide"] = make_lora(m.bert48, ad / "gamma_wide", r=2, seed=3)
    a["llama_task"] = make_lora(m.llama_cls, ad / "llama_task", targets=("q_proj", "v_proj"), seed=4)
    a["lm_one"] = make_lora(m.llama_lm, ad / "lm_one", targets=("q_proj", "v_proj", "down_proj"),
                            task_type="CAUSAL_LM", seed=5)
    a["lm_two"] = make_lora(m.llama_lm, ad / "lm_two", r=2, alpha=5, targets=("q_proj", "v_proj", "down_proj"),
                            task_type="CAUSAL_LM", seed=6)
    a["cls_one"] = make_lora(m.llama_cls, ad / "cls_one", targets=("q_proj", "v_proj"), seed=7)
    a["cls_two"] = make_lora(m.llama_cls, ad / "cls_two", r=2, targets=("q_proj", "v_proj"), seed=8)
    for tt, tag in (("FEATURE_EXTRACTION", "fe"), (None, "nt")):
        a[f"{tag}_one"] = make_lora(m.bare, ad / f"{tag}_one", task_type=tt, seed=9)
        a[f"{tag}_two"] = make_lora(m.bare, ad / f"{tag}_two", r=2, task_type=tt, seed=10)
    a["pissa_task"] = make_lora(m.bert, ad / "pissa_task", r=2, init_lora_weights="pissa", seed=12)
    a["olora_task"] = make_lora(m.bert, ad / "olora_task", r=2, init_lora_weights="olora", seed=13)
    a["pissa_conv"] = pissa_converted(m.bare, ad / "pissa_conv", root / "pissa_init")
    a["l0_one"] = make_lora(m.bert, ad / "l0_one", layers_to_transform=[0], seed=14)
    a["l0_two"] = make_lora(m.bert, ad / "l0_two", r=2, layers_to_transform=[0], seed=15)
    regex = r".*layer\.1\.attention\.self\.(query|value)"
    a["rx_one"] = make_lora(m.bert, ad / "rx_one", targets=regex, seed=16)
    a["rx_two"] = make_lora(m.bert, ad / "rx_two", r=2, targets=regex, seed=17)
    a["lbias_one"] = make_lora(m.bert, ad / "lbias_one", lora_bias=True, seed=18)
    a["lbias_two"] = make_lora(m.bert, ad / "lbias_two", r=2, lora_bias=True, seed=19)
    # lora_only as SEQ_CLS; "all" without a task type (PEFT's SEQ_CLS + bias="all" also saves
    # classifier.original_module.bias / classifier.modules_to_save.bias, a quirk outside this contract)
    for mode, tt in (("lora_only", "SEQ_CLS"), ("all", None)):
        a[f"bias_{mode}_one"] = make_lora(m.bert, ad / f"bias_{mode}_one", bias=mode, task_type=tt, seed=24)
        a[f"bias_{mode}_two"] = make_lora(m.bert, ad / f"bias_{mode}_two", r=2, bias=mode, task_type=tt, seed=25)
    # no task type, but made on the classifier model (keys keep the "bert." prefix)
    a["plain_nt_one"] = make_lora(m.bert, ad / "plain_nt_one", task_type=None, seed=30)
    a["plain_nt_two"] = make_lora(m.bert, ad / "plain_nt_two", r=2, task_type=None, seed=31)
    a["notok_one"] = make_lora(m.llama_notok, ad / "notok_one", targets=("q_proj", "v_proj"), seed=26)
    a["notok_two"] = make_lora(m.llama_notok, ad / "notok_two", r=2, targets=("q_proj", "v_proj"), seed=27)
    a["pickle_task"] = make_lora(m.bert, ad / "pickle_task", seed=28, safe=False)
    a["embed_task"] = make_lora(m.bert, ad / "embed_task", targets=("word_embeddings", "query"), seed=29)
    # a real `orthomerge train` output (holds orthomerge.json)
    train_out = root / "trained_task"
    assert cli.main(["train", "--model", str(m.bert), "--task", "sentiment", "--out", str(train_out), "--quiet",
                     *SMALL_TRAIN]) == 0
    a["trained_task"] = train_out
    return SimpleNamespace(models=m, adapters=a, root=root)


class Work:
    """The test's working folder (``tmp_path``, checksummed) and helpers to put inputs into it."""

    def __init__(self, root: Path, stock, capsys):
        self.root, self.stock, self.capsys, self.m = root, stock, capsys, stock.models

    def adapter(self, name: str, dest: Path | str | None = None) -> Path:
        """A copy of the stock adapter ``name`` at ``dest`` (default ``in/<name>``)."""
        dest = self.root / (dest or Path("in") / name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.stock.adapters[name], dest)
        return dest

    def merge(self, adapters, out, *extra, method="task_arithmetic") -> Path:
        """Run a merge that must succeed (to prepare a previous output)."""
        run = run_cli(self.capsys, merge_argv(method, adapters, out, *extra))
        assert_ok(run)
        return Path(out)

    def user_folder(self, rel_path: str) -> Path:
        d = self.root / rel_path
        d.mkdir(parents=True)
        (d / "notes.txt").write_text("my own notes\n")
        return d

    def file(self, rel_path: str, text: str = "n\n") -> Path:
        p = self.root / rel_path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p

    def toy_tasks(self) -> Path:
        """A user tasks YAML (task ``toy``, 2 labels) with its CSV files."""
        rows = ["great fun movie,1", "love the music,1", "good show,1", "awful boring plot,0", "bad actor,0",
                "hate the movie,0", "fun game,1", "boring show,0"]
        self.file("data/train.csv", "text,label\n" + "\n".join(rows) + "\n")
        self.file("data/test.csv", "text,label\n" + "\n".join(rows) + "\n")
        return self.file("data/toy.yaml", "- name: toy\n  train: train.csv\n  test: test.csv\n")


@pytest.fixture
def work(tmp_path, stock, capsys):
    return Work(tmp_path, stock, capsys)


# ---------------------------------------------------------------- the refusal table

@dataclass
class Case:
    argv: list
    needles: list[list[str]]
    cwd: Path | None = None
    max_s: float | None = None    # must refuse within this many seconds


REFUSALS: list[tuple[str, Callable[[Work], Case]]] = []


def refusal(row_id: str):
    def deco(fn):
        REFUSALS.append((row_id, fn))
        return fn
    return deco


# --- 1. data loss: --out


@refusal("out-nonempty-holding-inputs")
def _(w):
    vault = w.root / "vault"
    w.adapter("alpha_task", "vault/alpha_task")
    w.adapter("beta_task", "vault/beta_task")
    w.file("vault/mine.txt")
    return Case(merge_argv("task_arithmetic", ["vault/alpha_task", "vault/beta_task"], "vault"),
                [names(vault), ["exist"], ["--overwrite"]], cwd=w.root)


@refusal("out-nonempty-holding-inputs-overwrite")
def _(w):
    w.adapter("alpha_task", "vault/alpha_task")
    w.adapter("beta_task", "vault/beta_task")
    w.file("vault/mine.txt")
    return Case(merge_argv("task_arithmetic", ["vault/alpha_task", "vault/beta_task"], "vault", "--overwrite"),
                [names("vault")], cwd=w.root)


@refusal("out-user-folder")
def _(w):
    out = w.user_folder("my_things")
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), w.adapter("beta_task")], out),
                [names(out), ["exist"], ["--overwrite"]])


@refusal("out-user-folder-overwrite")
def _(w):
    out = w.user_folder("my_things")
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), w.adapter("beta_task")], out,
                           "--overwrite"), [names(out)])


@refusal("out-previous-merge-without-overwrite")
def _(w):
    prev = w.merge([w.adapter("old_one"), w.adapter("old_two")], w.root / "prev_merge")
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), w.adapter("beta_task")], prev),
                [names(prev), ["exist"], ["--overwrite"]])


def _previous_merge_holding(w, where: str):
    """An earlier merge output that holds an input adapter at ``where`` (directly or deeper)."""
    prev = w.merge([w.adapter("old_one"), w.adapter("old_two")], w.root / "prev_merge")
    held = w.adapter("alpha_task", f"prev_merge/{where}")
    return Case(merge_argv("task_arithmetic", [held, w.adapter("beta_task")], prev, "--overwrite"),
                [names(prev)])


refusal("out-previous-merge-holding-input-overwrite")(lambda w: _previous_merge_holding(w, "alpha_task"))
refusal("out-previous-merge-ancestor-of-input-overwrite")(
    lambda w: _previous_merge_holding(w, "nested/deeper/alpha_task"))


@refusal("out-is-input-merge-output-overwrite")
def _(w):
    prev = w.merge([w.adapter("old_one"), w.adapter("old_two")], w.root / "prev_merge")
    return Case(merge_argv("task_arithmetic", [prev, w.adapter("beta_task")], prev, "--overwrite"),
                [names(prev)])


@refusal("out-is-input-adapter")
def _(w):
    a = w.adapter("alpha_task")
    return Case(merge_argv("task_arithmetic", [a, w.adapter("beta_task")], a), [names(a)])


@refusal("out-is-input-adapter-overwrite")
def _(w):
    a = w.adapter("alpha_task")
    return Case(merge_argv("task_arithmetic", [a, w.adapter("beta_task")], a, "--overwrite"), [names(a)])


@refusal("out-dot-is-cwd-overwrite")
def _(w):
    prev = w.merge([w.adapter("old_one"), w.adapter("old_two")], w.root / "prev_merge")
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), w.adapter("beta_task")], ".",
                           "--overwrite"), [[".", "prev_merge", "current", "working"]], cwd=prev)


@refusal("out-ancestor-of-cwd-overwrite")
def _(w):
    prev = w.merge([w.adapter("old_one"), w.adapter("old_two")], w.root / "prev_merge")
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), w.adapter("beta_task")], prev,
                           "--overwrite"), [names(prev)], cwd=prev / "tasks" / "old_one")


@refusal("out-is-regular-file")
def _(w):
    f = w.file("afile.txt")
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), w.adapter("beta_task")], f), [names(f)])


@refusal("out-is-regular-file-overwrite")
def _(w):
    f = w.file("afile.txt")
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), w.adapter("beta_task")], f,
                           "--overwrite"), [names(f)])


@refusal("out-parent-is-regular-file")
def _(w):
    f = w.file("afile.txt")
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), w.adapter("beta_task")], f / "out"),
                [names(f) + [str(f / "out")]], max_s=20)


@refusal("train-out-nonempty")
def _(w):
    out = w.user_folder("my_things")
    return Case(["train", "--model", w.m.bert, "--task", "sentiment", "--out", out, "--quiet", *SMALL_TRAIN],
                [names(out), ["--overwrite"]])


@refusal("train-out-nonempty-overwrite")
def _(w):
    out = w.user_folder("my_things")
    return Case(["train", "--model", w.m.bert, "--task", "sentiment", "--out", out, "--overwrite", "--quiet",
                 *SMALL_TRAIN], [names(out)])


@refusal("train-out-is-regular-file")
def _(w):
    f = w.file("afile.txt")
    return Case(["train", "--model", w.m.bert, "--task", "sentiment", "--out", f, "--quiet", *SMALL_TRAIN],
                [names(f)])


# --- 4, 5. eval refuses what it cannot evaluate


@refusal("eval-llama-adapter-on-bert")
def _(w):
    a = w.adapter("llama_task")
    return Case(["eval", "--model", w.m.bert, "--adapter", a, "--task", "toy", "--tasks", w.toy_tasks(),
                 "--quiet"], [names(a), ["adapter_model.safetensors", "adapter_config.json"],
                              ["q_proj", "v_proj"]])


@refusal("eval-hidden-size-mismatch")
def _(w):
    a = w.adapter("gamma_wide")
    return Case(["eval", "--model", w.m.bert, "--adapter", a, "--task", "toy", "--tasks", w.toy_tasks(),
                 "--quiet"], [names(a)])


@refusal("eval-merge-output-without-task-head")
def _(w):
    out = w.merge([w.adapter("alpha_task"), w.adapter("beta_task")], w.root / "merged")
    return Case(["eval", "--model", w.m.bert, "--adapter", out, "--task", "toy", "--tasks", w.toy_tasks(),
                 "--quiet"], [["toy"], ["tasks", "head"], names(out)])


# --- 8. adapters whose base is not W₀


def _not_w0(w, stock_name=None, init=None):
    if stock_name:
        a = w.adapter(stock_name)
    else:
        a = edit_config(w.adapter("alpha_task", f"in/{init}_task"), init_lora_weights=init)
    return Case(merge_argv("task_arithmetic", [a, w.adapter("beta_task")], w.root / "out"),
                [["path_initial_model_for_weight_conversion"], names(a)])


refusal("init-pissa")(lambda w: _not_w0(w, "pissa_task"))
refusal("init-olora")(lambda w: _not_w0(w, "olora_task"))
for _init in ("corda", "loftq", "lora_ga", "pissa_niter_4"):
    refusal(f"init-{_init}-hand-edited")(lambda w, _init=_init: _not_w0(w, init=_init))


# --- 9, 10. numbers


@refusal("weights-overflow-float32")
def _(w):
    mods = adapter_modules(w.stock.adapters["alpha_task"])
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), w.adapter("beta_task")], w.root / "out",
                           "--weights", "1e39", "1"), [["finite"], mods + [m.split(".")[-1] for m in mods]])


for _method in ("ties", "dare_linear", "dare_ties"):
    refusal(f"density-0-{_method}")(lambda w, _method=_method: Case(
        merge_argv(_method, [w.adapter("alpha_task"), w.adapter("beta_task")], w.root / "out", "--density", "0"),
        [["density"]]))


@refusal("weights-count-mismatch")
def _(w):
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), w.adapter("beta_task")], w.root / "out",
                           "--weights", "1", "2", "3"), [["weights"]])


@refusal("rank-0")
def _(w):
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), w.adapter("beta_task")], w.root / "out",
                           "--rank", "0"), [["rank"]])


@refusal("unknown-method")
def _(w):
    return Case(merge_argv("no_such_method", [w.adapter("alpha_task"), w.adapter("beta_task")], w.root / "out"),
                [["no_such_method"]])


# --- 13. biases only with linear methods


for _bias in ("lbias", "bias_lora_only", "bias_all"):
    refusal(f"bias-{_bias}-with-ties")(lambda w, _bias=_bias: Case(
        merge_argv("ties", [w.adapter(f"{_bias}_one"), w.adapter(f"{_bias}_two")], w.root / "out",
                   "--model", w.m.bert),
        [["bias"], ["linear"], names(w.root / "in" / f"{_bias}_one") + names(w.root / "in" / f"{_bias}_two")]))


# --- 17. data-free merges with a config-only base


@refusal("config-only-base-shape-mismatch")
def _(w):
    a = w.adapter("gamma_wide")
    mods = adapter_modules(a)
    return Case(merge_argv("task_arithmetic", [a], w.root / "out", "--model", w.m.cfg_only),
                [mods + [m.split(".")[-1] for m in mods]])


@refusal("config-only-base-dense")
def _(w):
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), w.adapter("beta_task")], w.root / "out",
                           "--model", w.m.cfg_only, "--dense"), [names(w.m.cfg_only) + ["weight"]])


@refusal("base-shape-mismatch-with-model")
def _(w):
    a = w.adapter("gamma_wide")
    mods = adapter_modules(a)
    return Case(merge_argv("task_arithmetic", [a], w.root / "out", "--model", w.m.bert),
                [names(a), mods + [m.split(".")[-1] for m in mods]])


@refusal("llama-adapter-on-bert-model")
def _(w):
    a = w.adapter("llama_task")
    return Case(merge_argv("task_arithmetic", [a], w.root / "out", "--model", w.m.bert),
                [names(a), ["q_proj", "v_proj"]])


# --- inputs that are not what they claim


@refusal("pickle-adapter")
def _(w):
    a = w.adapter("pickle_task")
    return Case(merge_argv("task_arithmetic", [a, w.adapter("beta_task")], w.root / "out"),
                [names(a) + ["adapter_model.bin"]])


@refusal("adapter-config-invalid-json")
def _(w):
    a = w.adapter("alpha_task")
    (a / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    return Case(merge_argv("task_arithmetic", [a, w.adapter("beta_task")], w.root / "out"),
                [names(a), ["adapter_config.json"]])


@refusal("different-base-model")
def _(w):
    b = edit_config(w.adapter("beta_task"), base_model_name_or_path="someone/other-model")
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), b], w.root / "out"),
                [names(b) + ["someone/other-model"]])


@refusal("adapter-folder-missing")
def _(w):
    missing = w.root / "in" / "not_there"
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), missing], w.root / "out"), [names(missing)])


@refusal("different-target-modules")
def _(w):
    q = w.adapter("query_only")
    return Case(merge_argv("task_arithmetic", [w.adapter("alpha_task"), q], w.root / "out"),
                [names(q) + names(w.root / "in" / "alpha_task")])


@refusal("nan-in-factor")
def _(w):
    a = w.adapter("alpha_task")
    f = a / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(f))
    return Case(merge_argv("task_arithmetic", [a, w.adapter("beta_task")], w.root / "out"), [names(a)])


@refusal("embedding-lora")
def _(w):
    a = w.adapter("embed_task")
    return Case(merge_argv("task_arithmetic", [a], w.root / "out"), [names(a)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_agrees_with_numpy(dtype, monkeypatch):
    """The finiteness check every loader and merge uses (a float64 sum per chunk below float64) agrees with
    numpy's isfinite on planted NaN, ±Inf, Inf − Inf and the type's largest finite values."""
    from orthomerge import linalg
    from orthomerge.linalg import all_finite

    big = torch.finfo(dtype).max
    inf, nan = float("inf"), float("nan")
    cases = {"random": torch.randn(64, 16, dtype=dtype), "empty": torch.zeros(0, 4, dtype=dtype),
             "max": torch.full((1000, 8), big, dtype=dtype),
             "max both signs": torch.tensor([big, -big, big], dtype=dtype),
             "nan": torch.tensor([1.0, nan], dtype=dtype), "inf": torch.tensor([inf, 0.0], dtype=dtype),
             "-inf": torch.tensor([0.0, -inf], dtype=dtype), "inf - inf": torch.tensor([inf, -inf], dtype=dtype)}
    late = torch.zeros(5, 7, dtype=dtype)
    late[4, 6] = nan
    cases.update({"nan in the last chunk": late, "transposed": torch.tensor([[1.0, inf], [2.0, 3.0]], dtype=dtype).T})
    for chunk in (linalg.FINITE_CHUNK, 3):   # the chunked reduction: small chunks cross every case's rows
        monkeypatch.setattr(linalg, "FINITE_CHUNK", chunk)
        for name, t in cases.items():
            assert all_finite(t) == bool(np.isfinite(t.double().numpy()).all()), (name, chunk)
    assert all_finite(torch.tensor([1, 2]))


@pytest.mark.parametrize("build", [b for _, b in REFUSALS], ids=[i for i, _ in REFUSALS])
def test_refusal(build, work, capsys):
    case = build(work)
    before = tree_state(work.root)
    start = time.perf_counter()
    run = run_cli(capsys, case.argv, case.cwd)
    elapsed = time.perf_counter() - start
    assert_refused(run, case.needles, before, tree_state(work.root))
    if case.max_s is not None:
        assert elapsed < case.max_s, f"took {elapsed:.1f} s to refuse"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_refusal_read_only_parent(work, capsys):
    parent = work.root / "locked"
    parent.mkdir()
    before = tree_state(work.root)
    parent.chmod(0o555)
    try:
        run = run_cli(capsys, merge_argv("task_arithmetic", [work.adapter("alpha_task"), work.adapter("beta_task")],
                                         parent / "out"))
    finally:
        parent.chmod(0o755)
    assert_refused(run, [names(parent) + [str(parent / "out")]], before, tree_state(work.root))


# ---------------------------------------------------------------- 1. --out that is allowed


def test_out_existing_empty_folder_is_fine(work, capsys):
    out = work.root / "empty_out"
    out.mkdir()
    assert_ok(run_cli(capsys, merge_argv("task_arithmetic", [work.adapter("alpha_task"), work.adapter("beta_task")],
                                         out)))
    assert (out / "merge_report.json").exists() and (out / "tasks" / "alpha_task").is_dir()
    assert siblings(out) == []


@pytest.mark.parametrize("previous", ["merge", "train"])
def test_overwrite_replaces_only_orthomerge_output(previous, work, capsys):
    if previous == "merge":
        prev = work.merge([work.adapter("old_one"), work.adapter("old_two")], work.root / "prev")
        assert (prev / "tasks" / "old_one").is_dir()
    else:
        prev = work.adapter("trained_task", "prev")
        assert (prev / "orthomerge.json").exists()
    stale = prev / "tasks" / "old_one" if previous == "merge" else prev / "orthomerge_init.safetensors"
    assert stale.exists()
    alpha, beta = work.adapter("alpha_task"), work.adapter("beta_task")
    assert_ok(run_cli(capsys, merge_argv("task_arithmetic", [alpha, beta], prev, "--overwrite")))
    report = strict_json(prev / "merge_report.json")
    assert [a["name"] for a in report["adapters"]] == ["alpha_task", "beta_task"]
    for folder in (prev, prev / "tasks" / "alpha_task", prev / "tasks" / "beta_task"):
        assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    assert not stale.exists(), f"{stale} of the old output survived the overwrite"
    assert siblings(prev) == [], siblings(prev)
    assert (alpha / "adapter_config.json").exists() and (beta / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------- 2. a killed save


def test_killed_save_leaves_nothing_behind(work, capsys):
    out = work.root / "result"
    code = textwrap.dedent(f"""
        import os
        from orthomerge.outputs import atomic_dir
        with atomic_dir({str(out)!r}) as tmp:
            (tmp / "x").write_text("1")
            os._exit(9)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=work.root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 9, proc.stderr
    partial = siblings(out)
    assert len(partial) == 1, f"the simulated kill should leave one hidden partial sibling, found {partial}"
    # the user's own look-alikes, without orthomerge's marker
    (work.root / ".result.notes").write_text("mine\n")
    (work.root / ".result.keep").mkdir()
    (work.root / ".result.keep" / "data.txt").write_text("keep me\n")
    user_before = {k: v for k, v in tree_state(work.root).items() if ".result.notes" in k[1] or ".result.keep" in k[1]}
    run = run_cli(capsys, merge_argv("task_arithmetic", [work.adapter("alpha_task"), work.adapter("beta_task")], out))
    assert_ok(run)
    assert (out / "merge_report.json").exists()
    assert not (work.root / partial[0]).exists(), f"the killed run's partial {partial[0]} is still there"
    assert sorted(siblings(out)) == [".result.keep", ".result.notes"]
    user_after = {k: v for k, v in tree_state(work.root).items() if ".result.notes" in k[1] or ".result.keep" in k[1]}
    assert user_after == user_before


# ---------------------------------------------------------------- 3. the umask


def test_output_modes_follow_umask(work, capsys):
    out = work.root / "modes"
    old = os.umask(0o022)
    try:
        run = run_cli(capsys, merge_argv("task_arithmetic", [work.adapter("alpha_task"), work.adapter("beta_task")],
                                         out))
    finally:
        os.umask(old)
    assert_ok(run)
    for d in (out, out / "tasks", out / "tasks" / "alpha_task", out / "tasks" / "beta_task"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, f"{d}: {oct(stat.S_IMODE(d.stat().st_mode))}"
    for p in out.rglob("*"):
        want = 0o755 if p.is_dir() else 0o644
        assert stat.S_IMODE(p.stat().st_mode) == want, f"{p}: {oct(stat.S_IMODE(p.stat().st_mode))}"


# ---------------------------------------------------------------- 4. eval control (the YAML task works)


def test_eval_control_matching_adapter(work, capsys):
    run = run_cli(capsys, ["eval", "--model", work.m.bert, "--adapter", work.adapter("alpha_task"), "--task", "toy",
                           "--tasks", work.toy_tasks(), "--quiet"])
    assert_ok(run)
    assert "toy" in run.out


# ---------------------------------------------------------------- 6. dense output keeps the model class


def test_dense_causal_lm(work, capsys):
    from transformers import AutoModelForCausalLM

    one, two = work.adapter("lm_one"), work.adapter("lm_two")
    out = work.root / "dense_lm"
    assert_ok(run_cli(capsys, merge_argv("task_arithmetic", [one, two], out, "--dense", "--model", work.m.llama_lm,
                                         "--weights", "0.5", "1.5")))
    for folder in (out, out / "tasks" / "lm_one"):
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"], (folder, cfg["architectures"])
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    oracle = oracle_model(work.m.llama_lm, [one, two], [0.5, 1.5])
    x = llama_inputs()
    assert rel(outputs(model.eval(), x), outputs(oracle, x)) < 1e-4


def test_dense_seq_cls_still_classifier(work, capsys):
    from transformers import AutoModelForSequenceClassification

    one, two = work.adapter("cls_one"), work.adapter("cls_two")
    out = work.root / "dense_cls"
    assert_ok(run_cli(capsys, merge_argv("task_arithmetic", [one, two], out, "--dense", "--model", work.m.llama_cls)))
    folder = out / "tasks" / "cls_one"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    oracle = oracle_model(work.m.llama_cls, [one, two], head_from=one)
    x = llama_inputs()
    assert rel(outputs(model, x), outputs(oracle, x)) < 1e-4


# ---------------------------------------------------------------- 7. adapters on a bare encoder


@pytest.mark.parametrize("tag", ["fe", "nt"], ids=["FEATURE_EXTRACTION", "no-task-type"])
def test_bare_model_adapters(tag, work, capsys):
    one, two = work.adapter(f"{tag}_one"), work.adapter(f"{tag}_two")
    out = work.root / "bare_out"
    assert_ok(run_cli(capsys, merge_argv("task_arithmetic", [one, two], out, "--model", work.m.bare)))
    x = bert_inputs()
    got = outputs(peft_model(work.m.bare, out), x)
    assert rel(got, outputs(oracle_model(work.m.bare, [one, two]), x)) < 1e-4


# ---------------------------------------------------------------- 8. standard-LoRA inits are accepted


# EVA keeps W₀ and starts from B = 0 (PEFT changes no base weight for it), so its ΔW is relative to W₀.
@pytest.mark.parametrize("init", ["converted-pissa", "gaussian", "eva", False, True])
def test_w0_based_adapters_accepted(init, work, capsys):
    if init == "converted-pissa":   # PEFT wrote init_lora_weights=True after the conversion
        first, second, base = work.adapter("pissa_conv"), work.adapter("fe_two"), work.m.bare
        assert json.loads((first / "adapter_config.json").read_text())["init_lora_weights"] is True
    else:
        first = edit_config(work.adapter("alpha_task"), init_lora_weights=init)
        second, base = work.adapter("beta_task"), work.m.bert
    out = work.root / "out"
    assert_ok(run_cli(capsys, merge_argv("task_arithmetic", [first, second], out, "--model", base)))
    x = bert_inputs()
    got = outputs(peft_model(base, out), x)
    assert rel(got, outputs(oracle_model(base, [first, second]), x)) < 1e-4


# ---------------------------------------------------------------- 9. TIES with a huge weight


def test_ties_huge_weight_is_refused_or_finite(work, capsys):
    out = work.root / "out"
    run = run_cli(capsys, merge_argv("ties", [work.adapter("alpha_task"), work.adapter("beta_task")], out,
                                     "--weights", "1e20", "1"))
    assert not run.tb, run.tb
    if run.code == 2:
        assert len(run.err_lines) == 1 and run.err_lines[0].startswith(PREFIX), run.err
        assert not out.exists() and siblings(out) == []
        return
    assert_ok(run)
    assert not re.search(r"\b(nan|inf|infinity)\b", run.out, re.I), run.out
    report = strict_json(out / "merge_report.json")
    assert math.isfinite(report["total"]["rel_error"])
    for f in out.rglob("adapter_model.safetensors"):
        for k, t in load_file(str(f)).items():
            assert torch.isfinite(t).all(), f"{f}: {k} not finite"


# ---------------------------------------------------------------- 11. the reported re-compression error


def test_ties_full_rank_reports_zero_error(work, capsys):
    out = work.root / "out"
    assert_ok(run_cli(capsys, merge_argv("ties", [work.adapter("alpha_task"), work.adapter("beta_task")], out,
                                         "--rank", "32", "--density", "0.5")))
    report = strict_json(out / "merge_report.json")
    assert report["total"]["rel_error"] <= 1e-6, report["total"]


def test_truncation_error_is_exact(work, capsys):
    alpha, beta = work.adapter("alpha_task"), work.adapter("beta_task")
    out = work.root / "out"
    weights = [0.7, 1.3]
    assert_ok(run_cli(capsys, merge_argv("task_arithmetic", [alpha, beta], out, "--rank", "2",
                                         "--weights", *map(str, weights))))
    inputs = [peft_factor_deltas(work.m.bert, d) for d in (alpha, beta)]
    written = peft_factor_deltas(work.m.bert, out)
    assert set(written) == set(inputs[0])
    err_sq = tot_sq = 0.0
    report = strict_json(out / "merge_report.json")
    for m, got in written.items():
        want = sum(w * d[m] for w, d in zip(weights, inputs))
        assert np.linalg.matrix_rank(got) <= 2
        e, t = float(np.sum((want - got) ** 2)), float(np.sum(want ** 2))
        err_sq, tot_sq = err_sq + e, tot_sq + t
    mine = math.sqrt(err_sq / tot_sq)
    assert mine > 0.05, "rank 2 should discard something here"
    assert abs(report["total"]["rel_error"] - mine) <= 1e-6 * mine, (report["total"]["rel_error"], mine)


# ---------------------------------------------------------------- 12. target_modules = what the output holds


@pytest.mark.parametrize("tag", ["l0", "rx"], ids=["layers_to_transform", "regex-target"])
def test_written_targets_match_modules(tag, work, capsys, caplog):
    one, two = work.adapter(f"{tag}_one"), work.adapter(f"{tag}_two")
    out = work.root / "out"
    assert_ok(run_cli(capsys, merge_argv("task_arithmetic", [one, two], out)))
    x = bert_inputs()
    for folder, head in ((out, None), (out / "tasks" / f"{tag}_one", one)):
        caplog.clear()
        with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = outputs(peft_model(work.m.bert, folder), x)
        messages = [str(c.message) for c in caught] + [r.getMessage() for r in caplog.records]
        assert not [m for m in messages if "missing adapter keys" in m.lower()], (folder, messages)
        want = outputs(oracle_model(work.m.bert, [one, two], head_from=head), x)
        assert rel(got, want) < 1e-4, folder


# ---------------------------------------------------------------- 13. biases, linear methods


@pytest.mark.parametrize("tag", ["lbias", "bias_lora_only", "bias_all", "plain_nt"],
                         ids=["lora_bias", "bias-lora_only", "bias-all", "no-bias-no-task-type-control"])
def test_biases_merge_linearly(tag, work, capsys):
    one, two = work.adapter(f"{tag}_one"), work.adapter(f"{tag}_two")
    out = work.root / "out"
    weights = [0.6, 1.4]
    x = bert_inputs()
    # the oracle itself: one adapter at weight 1 is exactly PEFT's own forward of it
    single = outputs(oracle_model(work.m.bert, [one], head_from=one), x)
    assert rel(single, outputs(peft_model(work.m.bert, one), x)) < 1e-5
    assert_ok(run_cli(capsys, merge_argv("task_arithmetic", [one, two], out, "--model", work.m.bert,
                                         "--weights", *map(str, weights))))
    got = outputs(peft_model(work.m.bert, out), x)
    want = outputs(oracle_model(work.m.bert, [one, two], weights), x)
    base = outputs(load_base(work.m.bert), x)
    assert rel(want, base) > 1e-3, "the oracle should differ from the base"
    assert rel(got, want) < 1e-4


# ---------------------------------------------------------------- 14, 15, 17. bases that are partly missing


def test_llama_without_tokenizer_merges(work, capsys):
    assert_ok(run_cli(capsys, merge_argv("task_arithmetic", [work.adapter("notok_one"), work.adapter("notok_two")],
                                         work.root / "out", "--model", work.m.llama_notok)))
    assert (work.root / "out" / "merge_report.json").exists()


def test_base_not_local_validated_against_each_other(work, capsys):
    a = edit_config(work.adapter("alpha_task", "in/hub_one"), base_model_name_or_path="someone/not-here")
    b = edit_config(work.adapter("beta_task", "in/hub_two"), base_model_name_or_path="someone/not-here")
    run = run_cli(capsys, merge_argv("task_arithmetic", [a, b], work.root / "out"))
    assert_ok(run)
    assert "validated against each other only" in (run.err + run.out).lower(), (run.err, run.out)


def test_config_only_base_merges_data_free(work, capsys):
    a, b = work.adapter("alpha_task"), work.adapter("beta_task")
    out = work.root / "out"
    assert_ok(run_cli(capsys, merge_argv("task_arithmetic", [a, b], out, "--model", work.m.cfg_only)))
    x = bert_inputs()
    assert rel(outputs(peft_model(work.m.bert, out), x), outputs(oracle_model(work.m.bert, [a, b]), x)) < 1e-4


# ---------------------------------------------------------------- 16. importing and loading have no side effects


def _fresh_python(code: str, env_extra: dict | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_import_does_not_set_offline_env():
    out = _fresh_python("""
        import os, json
        import orthomerge.models, orthomerge.osrm
        print(json.dumps({k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}))
    """)
    assert json.loads(out.strip().splitlines()[-1]) == {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None}


def test_load_model_leaves_global_state(stock):
    # HF_HUB_OFFLINE is set by the test here only so that a local load can never reach a hub.
    out = _fresh_python(f"""
        import json, torch
        from transformers.utils import logging as hf_logging
        import orthomerge.models as om
        torch.manual_seed(1234)
        hf_logging.set_verbosity_info()
        hf_logging.enable_progress_bar()
        rng = torch.random.get_rng_state().clone()
        om.load_model({str(stock.models.bert)!r}, num_labels=2)
        print(json.dumps({{"rng": bool(torch.equal(rng, torch.random.get_rng_state())),
                          "progress": hf_logging.is_progress_bar_enabled(),
                          "verbosity": hf_logging.get_verbosity()}}))
    """, {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"rng": True, "progress": True, "verbosity": logging.INFO}, got


# ---------------------------------------------------------------- 18. DARE masks: seed and names, not bytes


def _total_rel(x: dict, y: dict) -> float:
    num = sum(float(np.sum((x[m] - y[m]) ** 2)) for m in y)
    return math.sqrt(num / sum(float(np.sum(y[m] ** 2)) for m in y))


def test_dare_masks_depend_on_seed_and_names(work, capsys):
    a, b = work.adapter("alpha_task", "one/alpha_task"), work.adapter("beta_task", "one/beta_task")
    a2 = work.adapter("alpha_task", "two/alpha_task")          # same folder name, another parent
    f = a2 / "adapter_model.safetensors"
    tensors = load_file(str(f))
    g = torch.Generator().manual_seed(0)
    for k, t in tensors.items():
        if "lora_" in k:
            tensors[k] = t + 1e-7 * t.abs() * torch.randn(t.shape, generator=g).sign()
    save_file(tensors, str(f))
    assert (a / "adapter_model.safetensors").read_bytes() != f.read_bytes()

    def dare(tag, adapters, seed):
        out = work.root / tag
        assert_ok(run_cli(capsys, merge_argv("dare_ties", adapters, out, "--seed", str(seed), "--density", "0.5",
                                             "--rank", "32")))
        return out

    first, again = dare("s3", [a, b], 3), dare("s3_again", [a, b], 3)
    ta, tb = load_file(str(first / "adapter_model.safetensors")), load_file(str(again / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), "same seed, different factors"
    ref = peft_factor_deltas(work.m.bert, first)
    perturbed = peft_factor_deltas(work.m.bert, dare("s3_perturbed", [a2, b], 3))
    assert _total_rel(perturbed, ref) < 1e-4, "a 1e-7 change of the factors changed the DARE masks"
    swapped = peft_factor_deltas(work.m.bert, dare("s3_swapped", [b, a], 3))
    assert _total_rel(swapped, ref) < 1e-5, "the adapters' order changed the result"
    other = peft_factor_deltas(work.m.bert, dare("s4", [a, b], 4))
    assert _total_rel(other, ref) > 0.05, "--seed 4 gave the same masks as --seed 3"


# ---------------------------------------------------------------- duplicates


def test_same_adapter_twice_is_unique_or_refused(work, capsys):
    a = work.adapter("alpha_task")
    out = work.root / "out"
    before = tree_state(work.root)
    run = run_cli(capsys, merge_argv("task_arithmetic", [a, a], out))
    assert not run.tb, run.tb
    if run.code == 2:
        assert_refused(run, [names(a)], before, tree_state(work.root))
        return
    assert_ok(run)
    tasks = sorted(p.name for p in (out / "tasks").iterdir())
    assert len(tasks) == 2 and len(set(tasks)) == 2, tasks
