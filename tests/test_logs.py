"""What the processes log when nothing happens: nothing at INFO."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from celery.app import trace

from dispatcher.logs import QuietTasks
from dispatcher.registry import Registry
from tests.support import make_ready, register


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kept() -> Iterator[Kept]:
    """A handler as the processes' (dispatcher.logs.configure_logging), on Celery's loggers."""
    handler = Kept()
    handler.addFilter(QuietTasks(frozenset({"dispatcher.scan_nodes"})))
    loggers = [logging.getLogger(name) for name in ("celery.worker.strategy", "celery.app.trace", "celery.beat")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def celery_lines(name: str) -> None:
    """The lines Celery's worker and beat log for one run of a task, through their own code."""
    context = {"id": "t-1", "name": name, "args": "()", "kwargs": "{}", "eta": None}
    logging.getLogger("celery.worker.strategy").info(trace.LOG_RECEIVED, context, extra={"data": context})
    trace.info(trace.LOG_SUCCESS, {**context, "return_value": "{}", "runtime": 0.01})
    logging.getLogger("celery.beat").info("Scheduler: Sending due task %s (%s)", "scan-nodes", name)


def test_celerys_lines_about_internal_tasks_are_debug(kept: Kept) -> None:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    try:
        celery_lines("dispatcher.scan_nodes")
        assert kept.records == [], "an internal task runs without a line at INFO"
        celery_lines("dispatcher.submit_job")
        assert [r.levelname for r in kept.records] == ["INFO"] * 3, "the contract's tasks keep theirs"
        kept.records.clear()
        root.setLevel(logging.DEBUG)
        celery_lines("dispatcher.scan_nodes")
        assert [r.levelname for r in kept.records] == ["DEBUG"] * 3, "at DEBUG, they are there"
    finally:
        root.setLevel(level)


def test_a_scan_that_changes_nothing_logs_at_debug(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    reg = register(registry)
    now = make_ready(registry, reg)
    caplog.set_level(logging.DEBUG, logger="dispatcher.registry")
    registry.scan(now=now + 1000)
    registry.scan(now=now + 60_000)  # heartbeat timeout: offline
    summaries = [r for r in caplog.records if getattr(r, "event", None) == "scan_summary"]
    assert [(r.levelname, r.expired) for r in summaries] == [("DEBUG", 0), ("INFO", 1)]  # type: ignore[attr-defined]
