"""The dispatcher's one clock. Liveness and status rules use it, never a node's."""

from __future__ import annotations

import time
from collections.abc import Callable

#: A clock returns the current time in milliseconds since the Unix epoch.
Clock = Callable[[], int]


def now_ms() -> int:
    """This host's wall clock, in milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000
