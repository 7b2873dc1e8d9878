"""orthomerge.outputs: the rules for writing outputs and the crash-safe replace, unit by unit."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from orthomerge import outputs
from orthomerge.errors import OrthomergeError
from orthomerge.outputs import atomic_dir, atomic_file, check_output, recover


def dead_pid() -> int:
    """The pid of a process that has exited (reaped), so nothing can be running under it now."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_new_and_empty_folders_are_fine(tmp_path):
    assert check_output(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty")


@pytest.mark.parametrize("marker", outputs.MARKERS)
def test_own_output_needs_overwrite(tmp_path, marker):
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_text("{}")
    with pytest.raises(OrthomergeError, match="--overwrite"):
        check_output(out)
    check_output(out, overwrite=True)


def test_foreign_folder_input_holder_and_cwd_refused_even_with_overwrite(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("n")
    (mine / "merge_report.json").write_text("{}")
    with pytest.raises(OrthomergeError, match="holds the input"):
        check_output(mine, overwrite=True, inputs=[mine / "adapter"])
    (mine / "merge_report.json").unlink()
    with pytest.raises(OrthomergeError, match="not written by orthomerge"):
        check_output(mine, overwrite=True)
    monkeypatch.chdir(mine)
    with pytest.raises(OrthomergeError, match="working directory"):
        check_output(".", overwrite=True)
    with pytest.raises(OrthomergeError, match="working directory"):
        check_output(tmp_path, overwrite=True)


def test_files_and_parents(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OrthomergeError, match="is a file"):
        check_output(blocker / "out")
    with pytest.raises(OrthomergeError, match="not a folder"):
        check_output(blocker)
    with pytest.raises(OrthomergeError, match="--overwrite"):
        check_output(blocker, is_file=True)
    check_output(blocker, is_file=True, overwrite=True)


def test_resume_accepts_an_own_folder_only(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapters").mkdir()
    with pytest.raises(OrthomergeError, match="not written by orthomerge"):
        check_output(out, resume=True)
    (out / outputs.EXPERIMENT_MARKER).touch()
    check_output(out, resume=True)


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_keeps_no_trace_with_or_without_rename_exchange(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half").write_text("h")
            raise RuntimeError("boom")
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recover_restores_an_output_moved_aside_and_removes_dead_partials(tmp_path, caplog):
    out = tmp_path / "out"
    pid = dead_pid()
    aside = tmp_path / f".out.orthomerge-old-{pid}-abcd0123"
    aside.mkdir()
    (aside / "kept.txt").write_text("k")
    partial = tmp_path / f".out.orthomerge-tmp-{pid}-0123abcd"
    partial.mkdir()
    live = tmp_path / f".out.orthomerge-tmp-{os.getpid()}-99999999"
    live.mkdir()
    users = tmp_path / ".out.notes"
    users.write_text("mine")
    with caplog.at_level("WARNING", logger="orthomerge"):
        recover(out)
    assert (out / "kept.txt").read_text() == "k"
    assert not partial.exists() and not aside.exists()
    assert live.exists() and users.read_text() == "mine"
    assert "restored" in caplog.text and "partial" in caplog.text


def test_modes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_file(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "g.txt").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "d" / "g.txt").stat().st_mode) == 0o640
