"""Writing one section of BENCHMARKS.md, shared by the benchmark scripts."""
from __future__ import annotations

import os
from pathlib import Path

PATH = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(text: str) -> None:
    """Replace the section whose heading is the first line of ``text`` (up to the next ``## ``), or append
    it; every other byte of the file stays. The file is re-read right before writing (others edit it too)."""
    doc = PATH.read_text() if PATH.exists() else "# Benchmarks\n"
    heading = text.splitlines()[0] + "\n"
    start = 0 if doc.startswith(heading) else (doc.find("\n" + heading) + 1 if ("\n" + heading) in doc else -1)
    if start == -1:
        doc = doc.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        nxt = doc.find("\n## ", start + 1)
        doc = doc[:start] + text.rstrip("\n") + "\n" + ("\n" + doc[nxt + 1:] if nxt != -1 else "")
    PATH.write_text(doc)


def machine_load() -> str:
    """The machine's load when a benchmark starts, for its notes (timings on a shared machine need it)."""
    try:
        one, five, _ = os.getloadavg()
        return f"1-minute load {one:.2f} at the start (5-minute {five:.2f})"
    except OSError:
        return "load unknown"
