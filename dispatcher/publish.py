"""Job states into Celery: the result backend for clients, task events for Flower.

Ordering: a STARTED write may race the final one (the web process writes
STARTED when a node acks; a worker writes the end). Every STARTED write is
therefore followed by a look at our own record, and a finished job's final
state is written again; every final write happens after our record says
finished. Whatever the interleaving, the final state is written last.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Any

import redis
from celery import Celery, states

from dispatcher.errors import JobFailed, JobTimedOut, NodeLost, NoEligibleNode
from dispatcher.keys import Keys
from dispatcher.logs import log_event
from dispatcher.metrics import ASSIGN_TO_RESULT, JOBS_FINISHED

log = logging.getLogger("dispatcher.publish")

_FAILURES = {"NO_ELIGIBLE_NODE": NoEligibleNode, "TIMEOUT": JobTimedOut, "NODE_LOST": NodeLost,
             "DRAIN_DEADLINE": NodeLost}


def failure_exception(outcome: dict[str, Any]) -> JobFailed:
    """The exception a client's ``get()`` raises for a failed job."""
    code = outcome.get("code", "FAILED")
    message = outcome.get("message", "")
    if code in _FAILURES:
        text = message
    else:
        text = f"{code}: {message}"
    if outcome.get("node_id") and code != "NO_ELIGIBLE_NODE":
        text += f" (node {outcome['node_id']}, attempt {outcome.get('attempt')} of {outcome.get('max_attempts')})"
    return _FAILURES.get(code, JobFailed)(text)


class Publisher:
    def __init__(self, app: Celery, client: redis.Redis, keys: Keys) -> None:
        self.app = app
        self.client = client
        self.keys = keys
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

    def started(self, job_id: str, node_id: str, attempt: int, progress: float | None = None,
                message: str | None = None, first: bool = False) -> None:
        """STARTED with ``info`` = {node_id, attempt, progress?}; then make sure an end is not buried."""
        meta: dict[str, Any] = {"node_id": node_id, "attempt": attempt}
        if progress is not None:
            meta["progress"] = progress
        if message:
            meta["message"] = message
        self.app.backend.store_result(job_id, meta, states.STARTED)
        if first:
            self._event("task-started", job_id, hostname=f"node:{node_id}", node_id=node_id, attempt=attempt)
        if self.client.hget(self.keys.job(job_id), "state") in ("succeeded", "failed", "cancelled"):
            self.finished(job_id)

    def retried(self, job_id: str, reason: str) -> None:
        self._event("task-retried", job_id, exception=reason, traceback="")

    def finished(self, job_id: str) -> None:
        """Write the job's end to the backend and tell Flower; idempotent."""
        state, outcome_text, output, assigned_ms, result_ms = self.client.hmget(
            self.keys.job(job_id), "state", "outcome", "output", "assigned_ms", "result_received_ms")
        if outcome_text is None:
            self.client.zrem(self.keys.publish(), job_id)  # expired or never ours
            return
        outcome = json.loads(outcome_text)
        backend = self.app.backend
        # Flower shows the hostname of a task's last event as its worker: the node that ran it.
        node = f"node:{outcome['node_id']}" if outcome.get("node_id") else None
        if state == "succeeded":
            result = json.loads(output) if output is not None else None
            backend.mark_as_done(job_id, result)
            self._event("task-succeeded", job_id, hostname=node, result=repr(result)[:1000],
                        runtime=(outcome.get("duration_ms") or 0) / 1000)
        elif state == "failed":
            exc = failure_exception(outcome)
            backend.mark_as_failure(job_id, exc)
            self._event("task-failed", job_id, hostname=node, exception=repr(exc), traceback="")
        elif state == "cancelled":
            reason = f"cancelled: {outcome.get('reason') or 'no reason given'}"
            backend.mark_as_revoked(job_id, reason)
            self._event("task-revoked", job_id, terminated=False, signum=None, expired=False)
        else:
            return
        if not self.client.zrem(self.keys.publish(), job_id):
            return  # published before (this was a re-check): counted then
        JOBS_FINISHED.labels(state).inc()
        if state in ("succeeded", "failed") and assigned_ms and result_ms:
            ASSIGN_TO_RESULT.observe((int(result_ms) - int(assigned_ms)) / 1000)
        log_event(log, "job_finished", job_id=job_id, state=state, code=outcome.get("code"),
                  node_id=outcome.get("node_id"), attempt=outcome.get("attempt"))
