"""What Flower, the logs and the metrics are told of a job's life.

Celery's result backend is not written here: the job scripts write a job's
Celery state in the same atomic step as our own record of it (see
``celery_state`` in lua/_job.lua), so the two never disagree and a final state
is written exactly once. This module sends the task events Flower builds its
view from, and logs and counts each end; an event lost with a crashing process
costs Flower a line, never a client its result.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from celery import Celery

from dispatcher.logs import log_event
from dispatcher.metrics import ASSIGN_TO_RESULT, JOBS_FINISHED

log = logging.getLogger("dispatcher.publish")


class Publisher:
    """Task events for Flower, and a log line and a count for each job that ends."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._hostname = f"dispatcher@{socket.gethostname()}"
        # One long-lived event dispatcher per process (building one per event costs
        # more than the rest of a completion); the lock serialises its channel.
        self._events: Any = None
        self._events_lock = threading.Lock()

    def _event(self, kind: str, job_id: str, hostname: str | None = None, **fields: Any) -> None:
        try:
            with self._events_lock:
                if self._events is None:
                    self._events = self.app.events.Dispatcher(self.app.connection_for_write(),
                                                              hostname=self._hostname)
                # send() stamps the dispatcher's own hostname: "started on node X" is said through it.
                self._events.hostname = hostname or self._hostname
                self._events.send(kind, uuid=job_id, **fields)
        except Exception as exc:  # noqa: BLE001 - monitoring must never fail a job
            log_event(log, "event_failed", logging.WARNING, job_id=job_id, kind=kind, error=str(exc))
            self._events = None

    def received(self, job_id: str, kwargs_repr: str) -> None:
        """A submission reached a worker: Flower lists the job (its payload never shown)."""
        self._event("task-received", job_id, name="dispatcher.submit_job", args="()", kwargs=kwargs_repr,
                    retries=0, eta=None, expires=None, root_id=job_id, parent_id=None)

    def refused(self, job_id: str, exc: Exception) -> None:
        self._event("task-failed", job_id, exception=f"{type(exc).__name__}({str(exc)!r})", traceback="")

    def started(self, job_id: str, node_id: str, attempt: int) -> None:
        """The node acknowledged the job: Flower shows it running there."""
        self._event("task-started", job_id, hostname=f"node:{node_id}", node_id=node_id, attempt=attempt)
        log_event(log, "job_started", job_id=job_id, node_id=node_id, attempt=attempt)

    def retried(self, job_id: str, reason: str) -> None:
        self._event("task-retried", job_id, exception=reason, traceback="")

    def finished(self, job_id: str, outcome: dict[str, Any], output: str | None = None,
                 assigned_ms: int | None = None, result_ms: int | None = None) -> None:
        """The job ended (its script wrote the state): tell Flower, log and count it.
        ``outcome`` is what the script recorded (with ``text`` for a failure or a cancel)."""
        state = outcome.get("state", "")
        # Flower shows the hostname of a task's last event as its worker: the node that ran it.
        node = f"node:{outcome['node_id']}" if outcome.get("node_id") else None
        if state == "succeeded":
            self._event("task-succeeded", job_id, hostname=node, result=(output or "null")[:1000],
                        runtime=(outcome.get("duration_ms") or 0) / 1000)
        elif state == "failed":
            self._event("task-failed", job_id, hostname=node, exception=outcome.get("text", ""), traceback="")
        else:
            self._event("task-revoked", job_id, terminated=False, signum=None, expired=False)
        JOBS_FINISHED.labels(state).inc()
        if state in ("succeeded", "failed") and assigned_ms and result_ms:
            ASSIGN_TO_RESULT.observe((result_ms - assigned_ms) / 1000)
        log_event(log, "job_finished", job_id=job_id, state=state, code=outcome.get("code"),
                  node_id=outcome.get("node_id"), attempt=outcome.get("attempt"))
