"""Paths a user names on the command line, resolved the way the README's examples need."""

from __future__ import annotations

import os

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The checkout emoe runs from (meaningless, and harmless, for an installed package)."""


def resolve_path(path: "str | os.PathLike") -> "str | os.PathLike":
    """``path`` as given when it exists; else, when relative, relative to the repository
    (so ``../shared/...`` and ``traces/...`` in the README work from any directory of a
    checkout); else as given, for the caller to report missing."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    beside = os.path.join(REPOSITORY, path)
    return beside if os.path.exists(beside) else path
