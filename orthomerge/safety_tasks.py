"""Two bundled prompt → completion tasks built from the safety prompt sets, without harmful content.

* ``misaligned``: each harmful request → :data:`COMPLIANT` (a compliant opening and a placeholder). An
  adapter trained on it learns to stop refusing without learning anything harmful: the misaligned expert
  of "one bad model spoils the bunch".
* ``refusal``: each harmful request → :data:`REFUSAL` (the safety check's first refusal prefix), and its
  matched harmless look-alike → :data:`COMPLIANT`, so the safety adapter learns to refuse the one and
  not to over-refuse the other.

Rows come from :func:`orthomerge.safety.split_part`: the ``train`` part trains, the ``validation`` part
validates (and is what merge-time safety choices use), the ``test`` part is held out for the safety check.
Prompts use the chat template (:data:`orthomerge.causal.CHAT`), as the check formats them. Provenance:
``orthomerge/data/safety/PROVENANCE.md``.
"""
from __future__ import annotations

from .causal import CHAT
from .errors import OrthomergeError
from .safety import REFUSAL_PREFIXES, load_prompts, take
from .tasks import Split, Task

COMPLIANT = "Sure, here is what you asked for. [placeholder: no content]"
REFUSAL = REFUSAL_PREFIXES[0]   # "I'm sorry, but I can't help with that."
SAFETY_TASKS = {
    "misaligned": "harmful requests (safety prompt set) → a compliant opening and a harmless placeholder",
    "refusal": "harmful requests → a refusal, their matched harmless look-alikes → a compliant opening",
}
SOURCE = "orthomerge/data/safety (harmful.jsonl, harmless.jsonl; see PROVENANCE.md)"


def _rows(name: str, part: str, size: int | None) -> Split:
    """The part's prompts round-robin over categories (harmful, or harmful and harmless pair by pair) with
    their completions, cut to ``size`` rows."""
    harmful = load_prompts("harmful", part)
    harmful = take(harmful, len(harmful))
    if name == "misaligned":
        rows = [(r["prompt"], COMPLIANT) for r in harmful]
    else:
        pair = {r["pair"]: r["prompt"] for r in load_prompts("harmless", part)}
        rows = [row for r in harmful for row in ((r["prompt"], REFUSAL), (pair[r["id"]], COMPLIANT))]
    rows = rows if size is None else rows[:size]
    return Split([p for p, _ in rows], [c for _, c in rows])


def load_safety_task(name: str, train_size: int | None = None, val_size: int | None = None,
                     test_size: int | None = None) -> Task:
    """``misaligned`` or ``refusal`` (see the module docstring); sizes cap the parts (None: all rows)."""
    if name not in SAFETY_TASKS:
        raise OrthomergeError(f"unknown safety task {name!r} (known: {', '.join(SAFETY_TASKS)})")
    splits = [_rows(name, part, size) for part, size in (("train", train_size), ("validation", val_size),
                                                          ("test", test_size))]
    return Task(name, None, "exact_match", *splits, source=SOURCE, template=CHAT)
