"""What Flower, the logs and the metrics are told of a job's life.

Celery's result backend is not written here: the job scripts write a job's
Celery state in the same atomic step as our own record of it (see
``celery_state`` in lua/_job.lua), so the two never disagree and a final state
is written exactly once. This module sends the task events Flower builds its
view from, and logs and counts each end; an event lost with a crashing process
costs Flower a line, never a client its result.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Any

from celery import Celery, states

from dispatcher.logs import log_event
from dispatcher.metrics import ASSIGN_TO_RESULT, JOBS_FINISHED
from dispatcher.tally import TALLY
from dispatcher.vocabulary import CeleryState, JobState

log = logging.getLogger("dispatcher.publish")


#: A waiting job's Celery state (its meta says why it waits).
WAITING = CeleryState.WAITING
# Celery's event state (Flower's view, which loads this app) keeps the state of the highest
# rank a task has reached, whatever order events arrive in, and ranks a state it does not
# know above STARTED: a job that waited would be shown waiting while it runs. A job waits
# after a worker received it and before a node starts it: ranked between the two.
states.PRECEDENCE_LOOKUP[WAITING] = (states.precedence(states.STARTED) + states.precedence(states.RECEIVED)) / 2

#: Task events go out in batches: Celery's buffered event group, one message to
#: ``task.multi`` that Flower reads as the events it holds. A kombu publish costs more
#: CPU than the rest of an ack; batched, one is shared by the events of this long.
EVENTS_FLUSH_S = 0.25
#: Events held at most: a batch is sent when it reaches this size.
EVENTS_BATCH = 200


class Publisher:
    """Task events for Flower, and a log line and a count for each job that ends."""

    def __init__(self, app: Celery, count_per_node: bool = False) -> None:
        self.app = app
        #: Count each node's jobs finished too (per-node metrics, ``metrics_node_series``).
        self.count_per_node = count_per_node
        self._hostname = f"dispatcher@{socket.gethostname()}"
        # One long-lived event dispatcher per process (building one per event costs
        # more than the rest of a completion); the lock serialises its channel.
        self._events: Any = None
        self._events_lock = threading.Lock()
        self._flusher: threading.Thread | None = None

    def _dispatcher(self) -> Any:
        """The process's event dispatcher (the caller holds the lock)."""
        if self._events is None:
            self._events = self.app.events.Dispatcher(
                self.app.connection_for_write(), hostname=self._hostname, buffer_group={"task"},
                buffer_limit=EVENTS_BATCH, buffer_while_offline=False)
        if self._flusher is None:
            # Started by the first event, in the process that sends it (after a fork).
            self._flusher = threading.Thread(target=self._flush_every, name="events-flush", daemon=True)
            self._flusher.start()
        return self._events

    def send_task(self, name: str) -> None:
        """Queue one of the dispatcher's internal tasks (no result) on the events' own broker
        connection: a process publishes through one connection, not one more from Celery's
        producer pool (the Redis connection budget, docs/operations.md)."""
        with self._events_lock:
            try:
                self.app.send_task(name, connection=self._dispatcher().connection, ignore_result=True)
            except Exception:
                self._events = None
                raise

    def _event(self, kind: str, job_id: str, worker: str, **fields: Any) -> None:
        try:
            with self._events_lock:
                self._dispatcher()
                # send() stamps the dispatcher's hostname; a job's events name its worker.
                self._events.hostname = worker or self._hostname
                self._events.send(kind, uuid=job_id, **fields)
        except Exception as exc:  # noqa: BLE001 - monitoring must never fail a job
            log_event(log, "event_failed", logging.WARNING, job_id=job_id, kind=kind, error=str(exc))
            self._events = None

    def flush(self) -> None:
        """Send the events held; on failure they are dropped (an unreachable broker must not
        make them pile up)."""
        with self._events_lock:
            if self._events is None:
                return
            try:
                self._events.flush(errors=False)
            except Exception as exc:  # noqa: BLE001 - monitoring must never stop the process
                log_event(log, "events_dropped", logging.WARNING, error=str(exc)[:200])
                self._events = None

    def _flush_every(self) -> None:
        while True:
            time.sleep(EVENTS_FLUSH_S)
            self.flush()

    # Every event of a job names the Celery worker that took its submission, whichever
    # process sends it: Flower shows the hostname of a task's last event as its worker and
    # links it to that worker's page, which only a real worker has (a node's would be a
    # 404). The node that ran the job is its routing key: jobs reach a node through its queue.

    def received(self, job_id: str, kwargs_repr: str, worker: str) -> None:
        """A submission reached a worker: Flower lists the job (its payload never shown)."""
        self._event("task-received", job_id, worker, name="dispatcher.submit_job", args="()", kwargs=kwargs_repr,
                    retries=0, eta=None, expires=None, root_id=job_id, parent_id=None)

    def refused(self, job_id: str, exc: Exception, worker: str) -> None:
        text = f"{type(exc).__name__}({str(exc)!r})"
        self._event("task-failed", job_id, worker, exception=text, traceback=_traceback(job_id, text))

    def waiting(self, job_id: str, meta: dict[str, Any], worker: str) -> None:
        """The job waits for a node: Flower shows it WAITING, its result the reasons (what
        AsyncResult.info holds). Sent at once, not batched: a start sent by another process
        soon after must reach Flower after it."""
        self._event("task-waiting", job_id, worker, result=json.dumps(meta, separators=(",", ":"))[:1000])
        self.flush()

    def started(self, job_id: str, node_id: str, attempt: int, worker: str) -> None:
        """The node acknowledged the job: Flower shows it running there."""
        self._event("task-started", job_id, worker, routing_key=node_id, node_id=node_id, attempt=attempt)
        log_event(log, "job_started", job_id=job_id, node_id=node_id, attempt=attempt)

    def retried(self, job_id: str, reason: str, worker: str) -> None:
        self._event("task-retried", job_id, worker, exception=reason, traceback=_traceback(job_id, reason))

    def finished(self, job_id: str, outcome: dict[str, Any], output: str | None = None,
                 assigned_ms: int | None = None, result_ms: int | None = None) -> None:
        """The job ended (its script wrote the state): tell Flower, log and count it.
        ``outcome`` is what the script recorded (with ``text`` for a failure or a cancel,
        ``worker`` and the node's ``duration_ms``)."""
        state = outcome.get("state", "")
        worker = str(outcome.get("worker") or "")
        node = {"routing_key": outcome["node_id"]} if outcome.get("node_id") else {}
        if state == JobState.SUCCEEDED:
            self._event("task-succeeded", job_id, worker, result=(output or "null")[:1000],
                        runtime=(outcome.get("duration_ms") or 0) / 1000, **node)
        elif state == JobState.FAILED:
            text = outcome.get("text", "")
            self._event("task-failed", job_id, worker, exception=text, traceback=_traceback(job_id, text, outcome),
                        **node)
        else:
            self._event("task-revoked", job_id, worker, terminated=False, signum=None, expired=False)
        JOBS_FINISHED.labels(state).inc()
        if self.count_per_node and outcome.get("node_id"):
            TALLY.count_node(str(outcome["node_id"]), f"finished_{state}")
        if state in (JobState.SUCCEEDED, JobState.FAILED) and assigned_ms and result_ms:
            ASSIGN_TO_RESULT.observe((result_ms - assigned_ms) / 1000)
        log_event(log, "job_finished", job_id=job_id, state=state, code=outcome.get("code"),
                  node_id=outcome.get("node_id"), attempt=outcome.get("attempt"))


def _traceback(job_id: str, text: str, outcome: dict[str, Any] | None = None) -> str:
    """Where a job failed, as Celery's traceback text is read (`celery result --traceback`,
    Flower): the job, the node and attempt, then the error."""
    lines = [f"Job {job_id}"]
    if outcome and outcome.get("node_id"):
        lines.append(f"  on node {outcome['node_id']}, attempt {outcome.get('attempt')} of "
                     f"{outcome.get('max_attempts')}")
    if outcome and outcome.get("code"):
        fault = " (the node's own fault)" if outcome.get("node_fault") else ""
        lines.append(f"  error code {outcome['code']}{fault}")
    lines.append(text)
    return "\n".join(lines)
