"""Suggestions for mistyped names (config fields, flags): the closest valid ones."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, candidates: Iterable[str], cutoff: float = 0.7) -> list[str]:
    """The best ``difflib`` match of ``word`` among ``candidates``, and up to two more
    about as close (within 0.05 of its ratio); none below ``cutoff``."""
    scores = [(difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates]
    scores = sorted((s for s in scores if s[0] >= cutoff), key=lambda s: -s[0])
    return [c for score, c in scores[:3] if score >= scores[0][0] - 0.05]
