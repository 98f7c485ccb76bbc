"""What long work prints: progress lines on stderr and durations in one format."""

from __future__ import annotations

import math
import sys


def say(msg: str) -> None:
    """One progress line on stderr, flushed at once (stdout stays for results)."""
    print(msg, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``; ``?`` for an unknown (non-finite) duration."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def clock(seconds: float) -> str:
    """``H:MM:SS`` (the report's wall-clock columns)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
