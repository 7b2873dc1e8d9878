"""Writing outputs without ever losing a user's files.

Rules (checked by :func:`check_output` before any expensive work, and again when saving):

* a new or empty folder is written; an existing non-empty one only with ``overwrite=True`` and only when
  orthomerge wrote it (it holds one of :data:`MARKERS`);
* never a folder that is, or contains, an input, the working directory or one of its ancestors;
* never a path whose parent cannot hold it (a component is a file, or the parent is not writable).

Writes go to a hidden sibling ``.OUT.orthomerge-tmp-<pid>-<random>`` that is swapped in at the end: with
``renameat2(RENAME_EXCHANGE)`` where the kernel has it (one atomic step), else by renaming the old output
aside, the new one in, then removing the old — so a kill at any moment leaves the old or the new output.
A partial sibling left by a killed run (its process is gone) is removed by the next write to that path,
and an output renamed aside by a killed replace is put back.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from .errors import OrthomergeError

log = logging.getLogger("orthomerge")

# Files whose presence says "orthomerge wrote this folder" (merge output, adapter, experiment).
MARKERS = ("merge_report.json", "orthomerge.json", "results.json", "safety.md", ".orthomerge")
EXPERIMENT_MARKER = ".orthomerge"   # written first by an experiment, so an interrupted one is resumed
_TMP, _OLD = "orthomerge-tmp", "orthomerge-old"


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(out: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable = (),
                 is_file: bool = False, resume: bool = False) -> Path:
    """Refuse, in one line, an output location that cannot be written or whose writing would lose data.

    ``inputs``: paths the run reads (a folder that holds one is never replaced). ``resume``: an existing
    orthomerge output is written into (the experiment's cache), not replaced. Returns ``out`` as a Path.
    """
    out = Path(out)
    where = out.expanduser().absolute()
    real = Path(os.path.realpath(where))
    cwd = Path(os.path.realpath(Path.cwd()))
    if _is_within(cwd, real):
        raise OrthomergeError(f"{out}: exists and is the working directory or contains it; choose a new folder "
                              "(--overwrite never replaces it)")
    for item in inputs:
        source = Path(os.path.realpath(Path(item).expanduser().absolute()))
        if _is_within(source, real):
            raise OrthomergeError(f"{out}: exists and holds the input {item}; choose a new folder "
                                  "(--overwrite never replaces a folder that holds an input)")
    parent = where.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OrthomergeError(f"{out}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK) and not where.exists():
        raise OrthomergeError(f"{out}: cannot be created, {parent} is not writable")
    if is_file:
        if where.is_dir():
            raise OrthomergeError(f"{out}: is a folder, expected a file path")
        if where.exists() and not overwrite:
            raise OrthomergeError(f"{out}: exists; pass --overwrite to replace it")
        return out
    if where.exists() and not where.is_dir():
        raise OrthomergeError(f"{out}: exists and is not a folder")
    if where.is_dir() and any(where.iterdir()):
        ours = any((where / name).exists() for name in MARKERS)
        if resume and ours:
            return out
        if not ours:
            raise OrthomergeError(f"{out}: exists, is not empty and was not written by orthomerge (no "
                                  f"{' / '.join(MARKERS)}); choose a new folder (--overwrite replaces only "
                                  "orthomerge's own outputs)")
        if not overwrite:
            raise OrthomergeError(f"{out}: exists and is not empty; pass --overwrite to replace this earlier "
                                  "orthomerge output")
    if where.is_dir() and not os.access(where, os.W_OK | os.X_OK):
        raise OrthomergeError(f"{out}: is not writable")
    return out


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(out: Path) -> None:
    """Put back an output a killed replace had renamed aside, and remove partial writes of dead runs."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.({_TMP}|{_OLD})-(\d+)-[0-9a-f]+$")
    for sibling in sorted(out.parent.iterdir()):
        match = pattern.match(sibling.name)
        if not match or _pid_alive(int(match[2])):
            continue
        if match[1] == _OLD and not out.exists():
            os.replace(sibling, out)
            log.warning("%s: restored the earlier output that an interrupted run had moved aside", out)
        else:
            shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)
            log.warning("%s: removed %s, a partial output left by an interrupted run", out, sibling.name)


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _umask() -> int:
    """The process umask, read without changing it (Linux); else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(folder: Path) -> None:
    """Libraries that write through a private temporary file (safetensors) leave mode 0600: give every
    written file the mode a plain ``open`` would."""
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def _swap_in(tmp: Path, out: Path) -> None:
    """Make ``tmp`` the content of ``out``; the old content (if any) is removed after the switch."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        old = tmp                                  # now holds the previous output
    else:
        old = _sibling(out, _OLD)
        os.replace(out, old)
        os.replace(tmp, out)
    shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a new hidden folder beside ``out``; on success it becomes ``out``, on failure it is removed.

    The caller has checked ``out`` (:func:`check_output`); folders follow the umask like any file.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    tmp = _sibling(out, _TMP)
    os.mkdir(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _follow_umask(tmp)
    _swap_in(tmp, out)


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``out``; on success it is renamed to ``out`` (mode per umask)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    tmp = _sibling(out, _TMP)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, out)
