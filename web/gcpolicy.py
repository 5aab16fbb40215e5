"""Garbage collection in a web process that holds thousands of long-lived sessions.

CPython's full collection walks every object it tracks: with 10,000 node
sessions (over a million objects) it stopped the process for 0.4-1 s, and
every heartbeat in flight waited. A session lives for hours, so what has
survived a young collection will most likely live on: once a second the young
generations are collected and whatever survives is moved to the permanent
generation (``gc.freeze``, constant time), which no automatic collection walks.
A full collection then walks only what is younger than a second.

The price: a reference cycle among frozen objects that later becomes garbage is
never collected (objects freed by reference counting, nearly all, are freed as
usual). Sessions break the cycles they are known to make as they end
(web/admission.py, web/transport.py); ``reclaim`` collects the rest, at the cost
of one full pause, when an operator asks for it (SIGUSR2).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import Counter

from dispatcher.logs import log_event

log = logging.getLogger("web.gcpolicy")

#: Seconds between two freezes of what survived the young collections.
FREEZE_INTERVAL_S = 1.0


def start() -> None:
    """Freeze the survivors every ``FREEZE_INTERVAL_S`` from a daemon thread (a greenlet
    under gevent). CPython's thresholds stay: a young collection of 10,000 objects instead
    of 700 took 10-15 ms here."""
    threading.Thread(target=_freeze_loop, name="gc-freezer", daemon=True).start()


def freeze_survivors() -> None:
    """Collect the young generations, then freeze what is left of every generation."""
    gc.collect(1)
    gc.freeze()


def reclaim() -> int:
    """Collect every object, the frozen ones too (one full pause), then freeze again;
    returns the number of objects found unreachable."""
    started_s = time.perf_counter()
    gc.unfreeze()
    gc.set_debug(gc.DEBUG_SAVEALL)  # kept in gc.garbage a moment, to log which types leaked
    try:
        found = gc.collect()
        kinds = Counter(type(o).__name__ for o in gc.garbage).most_common(12)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    gc.collect()
    gc.freeze()
    log_event(log, "gc_reclaimed", unreachable=found, pause_ms=round((time.perf_counter() - started_s) * 1000),
              kinds=dict(kinds))
    return found


def _freeze_loop() -> None:
    while True:
        time.sleep(FREEZE_INTERVAL_S)
        freeze_survivors()
