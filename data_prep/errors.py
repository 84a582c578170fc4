"""The one exception type that data_prep raises for bad input, and the "did you mean" every such message offers.

The CLI prints it as a single ``error: ...`` line on stderr and exits with status 2, so every message must name
the file/key/value at fault and say what to do about it. :func:`did_you_mean` is shared with ``pretrain``'s
override and settings checks (it imports nothing heavy, so the command line can use it before torch is loaded).
"""

from __future__ import annotations

import difflib


class DataPrepError(Exception):
    """A user-facing error: printed as one line on stderr, exit status 2, no traceback."""


def nearest(name: str, candidates, n: int = 3) -> list[str]:
    """Up to ``n`` candidates closest to ``name``: similar spelling, or sharing a word (``lr_rate`` -> ``lr``)."""
    words = set(name.lower().split("_"))
    scored = []
    for candidate in set(candidates):
        score = difflib.SequenceMatcher(None, name.lower(), candidate.lower()).ratio()
        if candidate.lower() in words or set(candidate.lower().split("_")) <= words:
            score += 0.3
        if score >= 0.6:
            scored.append((-score, candidate))
    scored.sort()
    return [candidate for score, candidate in scored[:n] if score <= scored[0][0] + 0.15]  # near the best only


def did_you_mean(name: str, candidates, prefix: str = "") -> str:
    """``"did you mean PREFIX.a or PREFIX.b?"``, or ``""`` when nothing is close."""
    names = [f"{prefix}{c}" for c in nearest(name, candidates)]
    return f"did you mean {' or '.join(names)}?" if names else ""
