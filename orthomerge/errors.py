"""One exception type for every user-facing problem.

Every error a user can cause (bad file, wrong shape, missing column) is an :class:`OrthomergeError`
whose message is one line naming the file and the problem; the CLI prints it without a traceback.
"""
from __future__ import annotations


class OrthomergeError(Exception):
    """A problem with the user's input, reported as one line."""
