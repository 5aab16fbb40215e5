"""Runs the jobs the server assigns, through the operator's handler.

At most ``max_concurrent_jobs`` run at once, each on its own thread. Delivery
is at least once, so a job seen again (same ``job_id`` and ``attempt``) is not
run twice: a running one is acknowledged again, a finished one has its result
sent again.

Every frame is built as its model of ``dispatcher.messages`` (what the contract refuses
is refused here, in the agent, not by the server) and handed to ``send`` as the model's
JSON object: what the journal keeps on disk, and what the session turns back into the
model to send.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from dispatcher.agent.journal import JobJournal
from dispatcher.messages import JobAck, JobAssign, JobProgress, JobResult, NodeJobError, describe_validation_error

log = logging.getLogger("dispatcher.agent.runner")

#: Finished jobs remembered for deduplication.
_REMEMBERED = 1000
#: Error codes that say the node itself is failing, not the job: sent with ``node_fault``, they
#: count towards the node's health on the server (enough of them and it gets no more jobs).
NODE_FAULT_CODES = frozenset({"CUDA_ERROR", "OUT_OF_MEMORY", "MODEL_CRASHED"})

Handler = Callable[[dict[str, Any], "JobContext"], Any]
#: Takes one frame, as its model's JSON object (``model_dump(mode="json")``).
Send = Callable[[dict[str, Any]], None]


class JobFailed(Exception):
    """Raised by a handler to fail the job with a code; ``retryable`` lets the server try elsewhere;
    ``node_fault`` says the node is to blame (by default: a code of ``NODE_FAULT_CODES``)."""

    def __init__(self, code: str, message: str, retryable: bool = False, node_fault: bool | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.node_fault = code in NODE_FAULT_CODES if node_fault is None else node_fault


def classify(exc: BaseException) -> tuple[str, bool]:
    """The error code of an exception a handler raised, and whether it is the node's fault: out
    of memory (``MemoryError``, torch's ``OutOfMemoryError``) and CUDA errors are; anything else is
    the handler's (``HANDLER_ERROR``)."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__ or "out of memory" in text.lower():
        return "OUT_OF_MEMORY", True
    if "CUDA" in text or "cuDNN" in text or "NCCL" in text:
        return "CUDA_ERROR", True
    return "HANDLER_ERROR", False


@dataclass
class JobContext:
    job_id: str
    attempt: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    _send: Send | None = None

    def progress(self, fraction: float | None, message: str | None = None) -> None:
        """Report progress (0 to 1) to the server; cheap to call often."""
        if self._send is not None and not self.cancelled.is_set():
            self._send(wire(JobProgress(
                type="job_progress", job_id=self.job_id, attempt=self.attempt,
                progress=None if fraction is None else max(0.0, min(1.0, float(fraction))),
                message=None if message is None else str(message)[:1000])))


def load_handler(spec: str) -> Handler:
    """``package.module:function`` -> the function."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"handler {spec!r} must look like package.module:function")
    handler = getattr(importlib.import_module(module_name), attr, None)
    if not callable(handler):
        raise ValueError(f"handler {spec!r}: {attr} is not a function of {module_name}")
    return handler


class JobRunner:
    def __init__(self, handler: Handler, max_concurrent_jobs: int, send: Send,
                 journal: JobJournal | None = None) -> None:
        self.handler = handler
        self.max_concurrent_jobs = max_concurrent_jobs
        self._send = send
        #: What earlier processes of this agent started and finished (None: memory only).
        self._journal = journal
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent_jobs, thread_name_prefix="job")
        self._lock = threading.Lock()
        self._running: dict[tuple[str, int], JobContext] = {}
        self._finished: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()

    def running_job_ids(self) -> list[str]:
        with self._lock:
            return [job_id for job_id, _ in self._running]

    def assign(self, msg: JobAssign) -> None:
        key = (msg.job_id, msg.attempt)
        with self._lock:
            if key in self._finished:
                log.info("job delivered again after it finished; sending its result again",
                         extra={"event": "job_redelivered", "job_id": msg.job_id, "attempt": msg.attempt})
                self._send(self._finished[key])
                return
            if key in self._running:
                self._send(wire(JobAck(type="job_ack", job_id=msg.job_id, attempt=msg.attempt)))
                return
            if self._journal is not None and self._from_journal(key):
                return
            if len(self._running) >= self.max_concurrent_jobs:
                self._send(_failure(msg.job_id, msg.attempt, "NODE_AT_CAPACITY",
                                    f"node already runs {self.max_concurrent_jobs} "
                                    f"job{'' if self.max_concurrent_jobs == 1 else 's'}", retryable=True))
                return
            ctx = JobContext(msg.job_id, msg.attempt, _send=self._send)
            self._running[key] = ctx
        if self._journal is not None:
            self._journal.started(msg.job_id, msg.attempt)  # on disk before it runs
        self._send(wire(JobAck(type="job_ack", job_id=msg.job_id, attempt=msg.attempt)))
        log.info("job started", extra={"event": "job_started", "job_id": msg.job_id, "attempt": msg.attempt,
                                       "job_type": msg.job_type})
        self._pool.submit(self._run, msg, ctx)

    def _from_journal(self, key: tuple[str, int]) -> bool:
        """An attempt an earlier process of this agent ran: send its result again, or,
        when the crash cut it short (or its result was too large to keep), report it
        failed so that the server runs the job again as a new attempt. True when handled."""
        assert self._journal is not None
        frame = self._journal.result(key)
        if frame is None and not (self._journal.interrupted(key) or key in self._journal.finished):
            return False
        if frame is None:
            frame = _failure(key[0], key[1], "NODE_RESTARTED", "the node restarted while it held this attempt; "
                             "it is not run twice", retryable=True)
            self._journal.ended(key[0], key[1], frame)
        log.info("job delivered again after a restart; not running it twice",
                 extra={"event": "job_redelivered_after_restart", "job_id": key[0], "attempt": key[1],
                        "success": frame["success"]})
        self._finished[key] = frame
        self._send(frame)
        return True

    def cancel(self, job_id: str, attempt: int, reason: str) -> None:
        with self._lock:
            ctx = self._running.get((job_id, attempt))
        if ctx is not None:
            log.info("job cancelled", extra={"event": "job_cancelled", "job_id": job_id, "attempt": attempt,
                                             "reason": reason})
            ctx.cancelled.set()

    def _run(self, msg: JobAssign, ctx: JobContext) -> None:
        started = time.monotonic()
        job = msg.model_dump(mode="json", exclude={"type"})
        try:
            output = self.handler(job, ctx)
        except JobFailed as exc:
            frame = _failure(msg.job_id, msg.attempt, exc.code, str(exc), exc.retryable, exc.node_fault)
        except Exception as exc:  # the handler is the operator's code: report, don't die
            log.exception("handler failed", extra={"event": "handler_failed", "job_id": msg.job_id})
            code, node_fault = classify(exc)
            frame = _failure(msg.job_id, msg.attempt, code, f"{type(exc).__name__}: {exc}", True, node_fault)
        else:
            frame = self._success(msg, output, time.monotonic() - started)
        key = (msg.job_id, msg.attempt)
        if self._journal is not None:
            self._journal.ended(msg.job_id, msg.attempt, frame)  # on disk before the result leaves
        with self._lock:
            self._running.pop(key, None)
            self._finished[key] = frame
            while len(self._finished) > _REMEMBERED:
                self._finished.popitem(last=False)
        if ctx.cancelled.is_set():
            return  # the server already ended it; a result now would be ignored anyway
        log.info("job finished", extra={"event": "job_finished", "job_id": msg.job_id, "attempt": msg.attempt,
                                        "success": frame["success"]})
        self._send(frame)

    @staticmethod
    def _success(msg: JobAssign, output: Any, duration_s: float) -> dict[str, Any]:
        """The result frame of a handler's output; a failure (``INVALID_OUTPUT``, not retryable: it would
        come out the same) when the output is one the contract refuses or JSON cannot carry."""
        try:
            return wire(JobResult(type="job_result", job_id=msg.job_id, attempt=msg.attempt, success=True,
                                  output=output, duration_ms=int(duration_s * 1000)))
        except ValidationError as exc:
            why = describe_validation_error(exc)
        except PydanticSerializationError as exc:
            why = str(exc)
        log.warning("output refused", extra={"event": "invalid_output", "job_id": msg.job_id, "error": why})
        return _failure(msg.job_id, msg.attempt, "INVALID_OUTPUT", f"the handler's output cannot be sent: {why}",
                        retryable=False)

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._running:
                    return True
            time.sleep(0.1)
        return False


def wire(frame: BaseModel) -> dict[str, Any]:
    """A frame's JSON object, as its model writes it."""
    return frame.model_dump(mode="json")


def _failure(job_id: str, attempt: int, code: str, message: str, retryable: bool,
             node_fault: bool = False) -> dict[str, Any]:
    error = NodeJobError(code=code[:100], message=message[:10_000], retryable=retryable, node_fault=node_fault)
    return wire(JobResult(type="job_result", job_id=job_id, attempt=attempt, success=False, error=error))
