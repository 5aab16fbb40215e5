"""Structured logs: one JSON object per line, with an ``event`` name and its fields."""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections import deque
from typing import Any

from pythonjsonlogger.json import JsonFormatter

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def json_formatter() -> logging.Formatter:
    return JsonFormatter(_FORMAT, rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"})


class _NoHandOffTracebacks(logging.Filter):
    """dispatcher.submit_job ends with Celery's Ignore on purpose (the job's result
    comes later); Celery logs each one with a traceback, which says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        return not (record.name == "celery.app.trace" and isinstance(data, dict)
                    and data.get("description") == "ignored")


class QuietTasks(logging.Filter):
    """Celery logs each task a worker receives and ends, and beat each one it sends, at
    INFO: for internal tasks (the scan every few seconds, passes over waiting jobs) those
    are lines that say nothing happened. Theirs are DEBUG lines; what the tasks did, when
    they did something, they log themselves."""

    _LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.beat")

    def __init__(self, tasks: frozenset[str]) -> None:
        super().__init__()
        self.tasks = tasks

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or record.name not in self._LOGGERS:
            return True
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            task = data.get("name")
        else:  # beat: "Scheduler: Sending due task %s (%s)" % (entry name, task name)
            task = record.args[-1] if isinstance(record.args, tuple) and record.args else None
        if task not in self.tasks:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def configure_logging(level: str = "INFO", quiet_tasks: frozenset[str] = frozenset()) -> None:
    """Send every log record of the process to stdout as JSON lines; Celery's lines about the
    tasks ``quiet_tasks`` are DEBUG lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(json_formatter())
    handler.addFilter(_NoHandOffTracebacks())
    handler.addFilter(QuietTasks(quiet_tasks))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


#: Longest text a log field keeps: peers choose some of what is logged (ids, reasons).
MAX_FIELD_CHARS = 500


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return f"{value[:MAX_FIELD_CHARS]}... ({len(value)} characters)"
    return value


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one named event; ``fields`` become keys of the JSON line (long texts cut short)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"event": event, **{k: _bounded(v) for k, v in fields.items()}})


#: Long GC pauses seen since the last report: (wall time s, generation, pause_ms, cpu_ms, collected).
_gc_pauses: deque[tuple[float, int, float, float, int]] = deque(maxlen=100)


def watch_gc_pauses(threshold_ms: float = 100.0) -> None:
    """Record every garbage collection that stops the process longer than ``threshold_ms``.

    A full collection walks every live object: about 0.5 s for a web process
    holding 5,000 sessions. It is rare in steady state; this makes it visible
    (``report_gc_pauses`` logs them: a GC callback must not take locks).
    """
    started_s = started_cpu_s = 0.0

    def on_gc(phase: str, info: dict[str, int]) -> None:
        nonlocal started_s, started_cpu_s
        if phase == "start":
            started_s, started_cpu_s = time.perf_counter(), time.thread_time()
            return
        pause_ms = (time.perf_counter() - started_s) * 1000
        if pause_ms >= threshold_ms:
            # The CPU time too: on a busy machine the wall time includes the slices other processes took.
            cpu_ms = (time.thread_time() - started_cpu_s) * 1000
            _gc_pauses.append((time.time(), info["generation"], round(pause_ms, 1), round(cpu_ms, 1),
                               info["collected"]))

    gc.callbacks.append(on_gc)


def report_gc_pauses() -> None:
    """Log the long GC pauses recorded since the last call."""
    log = logging.getLogger("dispatcher.gc")
    while _gc_pauses:
        at_s, generation, pause_ms, cpu_ms, collected = _gc_pauses.popleft()
        log_event(log, "gc_pause", logging.WARNING, at_s=round(at_s, 3), generation=generation, pause_ms=pause_ms,
                  cpu_ms=cpu_ms, collected=collected)
