"""The life of a job: submission, the node's ack, progress and result, retries,
cancellation, and the passes that place waiting jobs.

Every change of a job is one fenced script, which writes the job's Celery
state with our own record of it; Flower, the logs and the metrics learn of it
through the publisher. The web process hands a node's result to the workers
through a stream; a worker applies it (dispatcher/completions.py): one script
frees the slot and ends the job or sends it back to wait. The periodic scan
(dispatcher/recovery.py) applies what a dead worker held, ends what timed out
and re-drives any step a crashed process left half-way.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import Celery

from dispatcher.clock import Clock, now_ms
from dispatcher.dispatch import Decision, Dispatcher
from dispatcher.errors import JobMoved, KindNeeded, StoreError, UnknownJob
from dispatcher.filter import JobNeeds
from dispatcher.health import job_failure_rules
from dispatcher.jobspec import JobSpec
from dispatcher.keys import Keys
from dispatcher.logs import log_event
from dispatcher.messages import JobAck, JobProgress, JobResult
from dispatcher.publish import Publisher
from dispatcher.records import JobRecord, as_int
from dispatcher.registry import transitioned
from dispatcher.scripts import (
    AlreadyFinished,
    Assigned,
    Completed,
    DispatchExpired,
    Exists,
    OutOfAttempts,
    Reply,
    Requeued,
    Scripts,
    Stale,
)
from dispatcher.settings import Settings
from dispatcher.store import optional_text, optional_texts, store_client, texts, unwrapped
from dispatcher.vocabulary import DecisionOutcome, JobState, NodeStatus

log = logging.getLogger("dispatcher.jobs")

#: Finished job records are kept this long for inspection.
RETENTION_MS = 7 * 24 * 3600 * 1000
#: Room left in a node frame around the payload.
_FRAME_OVERHEAD = 4096
#: Attempts of a script whose job moved to another node meanwhile.
_ATTEMPTS = 5

_Reply = TypeVar("_Reply")


class AttemptOutcome(enum.StrEnum):
    """What became of a job when an attempt of it ended: a node's result applied
    (``Jobs.complete``), or an attempt released (the scan's log lines)."""

    SUCCEEDED = JobState.SUCCEEDED.value
    FAILED = JobState.FAILED.value
    #: The job waits for another node.
    RETRY = "retry"
    #: Not the current attempt of that node: nothing changed.
    STALE = "stale"


class Jobs:
    """Jobs in Redis, changed only through the scripts (which keep Celery's view of them)."""

    def __init__(self, client: redis.Redis, settings: Settings, app: Celery, clock: Clock = now_ms, *,
                 keys: Keys | None = None, scripts: Scripts | None = None) -> None:
        #: Its commands raise StoreError (dispatcher/store.py), as do the scripts'.
        self.client = store_client(client)
        self.settings = settings
        self.app = app
        self.clock = clock
        # (given by dispatcher/core.py, which shares one of each among a process's parts)
        self.keys = keys or Keys(settings.key_prefix)
        self.scripts = scripts or Scripts(unwrapped(client), self.keys)
        self.dispatcher = Dispatcher(self.client, settings, self.scripts, clock)
        self.publisher = Publisher(app, count_per_node=settings.metrics_node_series > 0)
        #: How results and timeouts count against their node (the job scripts' ``job_health``).
        self.job_health = job_failure_rules(settings)

    # --- submission (worker) ---------------------------------------------------

    def submit(self, job_id: str, fields: dict[str, Any], worker: str = "") -> Decision | None:
        """Validate and record a job, and give it to a node when none waits before it. Raises
        InvalidJob naming the field. Returns None when this job id was submitted before.
        ``worker``: the Celery worker taking the submission, named in the job's task events."""
        spec = JobSpec.parse(job_id, fields, self.settings.max_message_bytes - _FRAME_OVERHEAD)
        needs = JobNeeds(tuple(spec.required_models), spec.require_gpu, spec.public,
                         tuple(sorted(spec.node_selector.items())))
        record = {
            "job_type": spec.job_type,
            "payload": spec.payload_json(),
            "required_models": json.dumps(spec.required_models),
            "require_gpu": spec.require_gpu,
            "public": spec.public,
            "timeout_seconds": spec.timeout_seconds,
            "timeout_ms": int(spec.timeout_seconds * 1000),
            "max_attempts": spec.max_attempts,
            "dispatch_timeout_ms": int(spec.dispatch_timeout_seconds * 1000),
            "priority": spec.priority,
            "node_selector": json.dumps(spec.node_selector, sort_keys=True),
            "needs": needs.to_json(),
            "worker": worker,
        }
        now = self.clock()
        reply = self.scripts.submit_job(job_id, needs.kind, now, spec.queue_score(now), record,
                                        self.dispatcher.search(needs))
        if reply is Reply.REVOKED:
            # Revoked through Celery before it arrived (a worker that had not heard of the
            # revoke took the message): its final state stands.
            log_event(log, "job_refused", job_id=job_id, why="revoked before it arrived")
            return None
        if isinstance(reply, Exists):
            if reply.state is JobState.WAITING:
                self.dispatch_waiting()  # a redelivered submission: make sure its pass happens
            return None
        if reply is Reply.QUEUED:
            # Others wait already: go through the queue in its order, so that a new job
            # never takes a slot before an older or more urgent one.
            self.dispatch_waiting()
        if isinstance(reply, Assigned):
            decision: Decision | None = Decision(job_id, DecisionOutcome.ASSIGNED, reply.node_id, reply.attempt,
                                                 reply.exclusions, waited_ms=reply.waited_ms)
        else:
            decision = self.note_waiting(job_id, needs)
            if decision is not None and spec.fail_fast and not self.dispatcher.could_ever_take(needs):
                decision = self.fail_now(job_id, needs)
        if decision is not None:
            self.dispatcher.record(decision)
        return decision

    def note_waiting(self, job_id: str, needs: JobNeeds) -> Decision | None:
        """Say why a waiting job waits (its Celery WAITING state, and Flower); None when it no
        longer waits."""
        decision = self.dispatcher.note_waiting(job_id, needs)
        if decision is not None and decision.meta is not None:
            self.publisher.waiting(job_id, decision.meta, decision.worker)
        return decision

    def fail_now(self, job_id: str, needs: JobNeeds) -> Decision | None:
        """Fail a waiting job at once with NoEligibleNode (``fail_fast``): no registered node
        could ever take it. The fleet is walked for the explanation, as at a dispatch deadline."""
        eligible, total, exclusions = self.dispatcher.explain(needs)
        decision = Decision(job_id, DecisionOutcome.FAILED, exclusions=exclusions, eligible=eligible, total=total)
        expired = self.scripts.expire_dispatch(job_id, needs.kind, self.clock(),
                                               "no registered node could ever take it: " + decision.summary(),
                                               exclusions, RETENTION_MS, at_once=True)
        if not isinstance(expired, DispatchExpired):
            return None  # placed or ended meanwhile
        self.publisher.finished(job_id, expired.outcome)
        return decision

    def place(self, job_id: str, needs: JobNeeds) -> Decision:
        """Try to dispatch a waiting job; a job that stays waiting has why noted."""
        decision = self.dispatcher.dispatch(job_id, needs)
        if decision.outcome is DecisionOutcome.WAITING:
            decision = self.note_waiting(job_id, needs) or Decision(job_id, DecisionOutcome.NOT_WAITING)
        if decision.outcome is not DecisionOutcome.NOT_WAITING:
            self.dispatcher.record(decision)
        return decision

    def stats(self) -> dict[str, Any]:
        """Dispatch statistics: decisions, exclusions by reason and their examples, waiting jobs."""
        return self.dispatcher.stats()

    # --- waiting jobs --------------------------------------------------------------

    def request_kick(self) -> None:
        """Capacity may have appeared: queue one pass over the waiting jobs (one, however many ask)."""
        if self.client.zcard(self.keys.waiting()) == 0:
            return
        if self.client.set(self.keys.kick(), "1", nx=True, px=5000):
            self.publisher.send_task("dispatcher.dispatch_waiting")

    def dispatch_waiting(self) -> int:
        """Place waiting jobs in order (priority, then age) while any ready node has a
        free slot. Jobs wait by kind of needs: a pass tries the first job of each kind,
        in the order of those first jobs, and drops a kind for the pass once no node
        takes it. So a pass costs one attempt per kind waiting plus one per job placed,
        however many jobs wait that no node can take; the first job of each kind left
        waiting has its reasons noted (one more call per kind)."""
        self.client.delete(self.keys.kick())
        placed = 0
        given_up: set[str] = set()
        free = self.dispatcher.free_slots_anywhere()
        while free:
            kinds = texts(self.client.zrange(self.keys.waiting_classes(), 0, len(given_up)))
            kind = next((k for k in kinds if k not in given_up), None)
            if kind is None:
                break
            pipe = self.client.pipeline(transaction=False)
            pipe.zrange(self.keys.waiting_class(kind), 0, 0)
            pipe.hget(self.keys.waiting_needs(), kind)
            head, needs_json = pipe.execute()
            if not head or needs_json is None:
                given_up.add(kind)  # emptied meanwhile
                continue
            decision = self.place(head[0], JobNeeds.from_json(needs_json))
            if decision.outcome is DecisionOutcome.ASSIGNED:
                placed += 1
                free = self.dispatcher.free_slots_anywhere()
            else:
                given_up.add(kind)  # (which took no slot: there is still one free)
        return placed

    # --- frames from nodes (web) -----------------------------------------------------

    def ack(self, node_id: str, msg: JobAck | JobProgress) -> str | None:
        """The node started the job (or reports progress). Returns the job's kind of needs
        (what its completion needs should the job wait again), or None for a stale frame."""
        progress = msg.progress if isinstance(msg, JobProgress) else None
        message = msg.message if isinstance(msg, JobProgress) else None
        acked = self.scripts.ack_job(msg.job_id, msg.attempt, node_id, self.clock(), progress, message)
        if isinstance(acked, Stale):
            log_event(log, "job_frame_ignored", job_id=msg.job_id, node_id=node_id, attempt=msg.attempt,
                      ref_type=msg.type, why="not the current attempt of this node")
            return None
        if acked.started:
            self.publisher.started(msg.job_id, node_id, msg.attempt, acked.worker)
        return acked.kind

    def report_result(self, node_id: str, msg: JobResult, kind: str | None = None) -> bool:
        """Hand the node's result to the workers (dispatcher/completions.py): one XADD.
        ``kind`` is the job's kind of needs when the session knows it (from the job's ack,
        which proves this node holds that attempt); unknown, the job's record is read first,
        and a result that cannot be the current attempt's is dropped here. Returns whether
        it was handed on."""
        if kind is None:
            state, holder, attempt, kind = optional_texts(self.client.hmget(
                self.keys.job(msg.job_id), "state", "node_id", "attempt", "needs_class"))
            if state not in (JobState.ASSIGNED, JobState.RUNNING) or holder != node_id or attempt != str(msg.attempt):
                log_event(log, "job_frame_ignored", job_id=msg.job_id, node_id=node_id, attempt=msg.attempt,
                          ref_type="job_result", why=f"stale: the job is {state or 'unknown'}")
                return False
        error = msg.error.model_dump(exclude_none=True) if msg.error else None
        if not msg.success and error is None:
            error = {"code": "NODE_ERROR", "message": "the node reported a failure without an error",
                     "retryable": False}
        self.client.xadd(self.keys.results(), {
            "job_id": msg.job_id, "node_id": node_id, "attempt": msg.attempt, "kind": kind or "",
            "meta": json.dumps({"success": msg.success, "error": error, "duration_ms": msg.duration_ms}),
            "output": json.dumps(msg.output, separators=(",", ":")), "received_ms": self.clock()})
        return True

    def complete(self, result: dict[str, str]) -> tuple[AttemptOutcome, bool]:
        """Apply one reported result (a worker): the job ends (its Celery result written with it)
        or waits for another node. Returns the outcome and whether a waiting job could take
        the freed slot."""
        job_id, node_id, attempt, kind = result["job_id"], result["node_id"], int(result["attempt"]), result["kind"]
        try:
            reply = self.scripts.complete_job(job_id, kind or None, node_id, attempt, self.clock(), result["meta"],
                                              result["output"], RETENTION_MS, self.job_health)
        except KindNeeded:
            kind = optional_text(self.client.hget(self.keys.job(job_id), "needs_class")) or ""
            reply = self.scripts.complete_job(job_id, kind or None, node_id, attempt, self.clock(), result["meta"],
                                              result["output"], RETENTION_MS, self.job_health)
        if isinstance(reply, Stale):
            log_event(log, "job_frame_ignored", job_id=job_id, node_id=node_id, attempt=attempt,
                      ref_type="job_result", why=f"stale: the job is {reply.state or 'unknown'}")
            return AttemptOutcome.STALE, False
        self.node_degraded(node_id, reply.degraded)
        if isinstance(reply, Completed):
            self.publisher.finished(job_id, reply.outcome, result["output"], reply.assigned_ms,
                                    as_int(result.get("received_ms")))
            return AttemptOutcome(reply.state), reply.kick
        self.publisher.retried(job_id, json.loads(result["meta"]).get("error", {}).get("message", ""), reply.worker)
        self.note_requeued(job_id)
        return AttemptOutcome.RETRY, True

    @staticmethod
    def node_degraded(node_id: str, reason: str) -> None:
        """Log and count the JobFailures transition a job script made (``reason`` "" when it made none)."""
        if reason:
            transitioned(node_id, NodeStatus.READY, NodeStatus.DEGRADED, reason)

    # --- cancellation (worker) -------------------------------------------------------

    def with_current_node(self, job_id: str, call: Callable[[str, str], _Reply]) -> _Reply:
        """Run a job+node script with the node the job is on (and the job's kind of
        needs), reading them again while the script raises JobMoved."""
        for _ in range(_ATTEMPTS):
            node_id, kind = optional_texts(self.client.hmget(self.keys.job(job_id), "node_id", "needs_class"))
            try:
                return call(node_id or "", kind or "")
            except JobMoved:
                continue
        raise StoreError(f"job {job_id} kept moving between nodes")

    def cancel(self, job_id: str, reason: str = "cancelled by the client") -> JobState:
        """Cancel a waiting or running job. Returns CANCELLED, or the state of a job already over."""
        reply = self.with_current_node(job_id, lambda node_id, kind: self.scripts.cancel_job(
            job_id, kind, node_id, self.clock(), reason, RETENTION_MS))
        if reply is Reply.UNKNOWN:
            raise UnknownJob(f"no job {job_id}")
        if isinstance(reply, AlreadyFinished):
            return reply.state
        log_event(log, "job_cancelled", job_id=job_id, node_id=reply.node_id or None, reason=reason)
        self.publisher.finished(job_id, reply.outcome)
        if reply.node_id:
            self.request_kick()
        return JobState.CANCELLED

    def after_release(self, job_id: str, reply: Requeued | OutOfAttempts) -> None:
        """A job left its node without a result: tell of its end, or of its retry; the
        slot may serve a waiting job."""
        if isinstance(reply, OutOfAttempts):
            self.publisher.finished(job_id, reply.outcome)
        else:
            last_error = optional_text(self.client.hget(self.keys.job(job_id), "last_error"))
            job = JobRecord.from_hash({"last_error": last_error})
            self.publisher.retried(job_id, (job.last_error or {}).get("message", ""), reply.worker)
            self.note_requeued(job_id)
        if self.client.exists(self.keys.waiting()):
            self.dispatch_waiting()

    def note_requeued(self, job_id: str) -> None:
        """A job back to waiting after an attempt: its client sees WAITING and why."""
        try:
            decision = self.note_waiting(job_id, self.needs_of(job_id))
        except UnknownJob:
            return
        if decision is not None:
            self.dispatcher.record(decision)

    def needs_of(self, job_id: str) -> JobNeeds:
        needs = JobNeeds.from_values(optional_texts(self.client.hmget(self.keys.job(job_id), JobNeeds.FIELDS)))
        if needs is None:
            raise UnknownJob(f"no job {job_id}")
        return needs
