"""How counts and times read, for every text a person reads (the CLI, the page, reasons):
one place, so that nothing says "1 jobs" or "since 0s ago"."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 job``, ``2 jobs``, ``0 jobs`` (``nouns``: an irregular plural)."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


#: Units of a duration, largest first: (long name, compact name, seconds).
_UNITS = (("d", "d", 86400), ("h", "h", 3600), ("min", "m", 60))


def duration(seconds: float | None, compact: bool = False) -> str:
    """``under 1 s``, ``5 s``, ``3 min``, ``2 h``, ``1 d`` (``compact``: ``0s``, ``5s``, ``3m``, for
    table columns); ``-`` when unknown. Rounded down to the largest unit: 119 s is ``1 min``."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for name, short, size in _UNITS:
        if seconds >= size:
            return f"{int(seconds // size)}{short if compact else ' ' + name}"
    if compact:
        return f"{int(seconds)}s"
    return f"{int(seconds)} s" if seconds >= 1 else "under 1 s"


def seconds_since(then_ms: object, now_ms: int) -> float | None:
    """Seconds from ``then_ms`` to ``now_ms``; None when ``then_ms`` is no number or too far off
    for a float (a view shows a stored time as it is: it may be anything)."""
    if not isinstance(then_ms, (int, float)) or isinstance(then_ms, bool):
        return None
    try:
        return (now_ms - then_ms) / 1000
    except OverflowError:
        return None


def ago(seconds: float | None) -> str:
    """``just now`` (under a second), ``5 s ago``, ``3 min ago``; ``never`` when unknown."""
    if seconds is None:
        return "never"
    return "just now" if seconds < 1 else f"{duration(seconds)} ago"
