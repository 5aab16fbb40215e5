"""The life of a job: submission, the node's ack, progress and result,
completion, retries, cancellation, timeouts and node loss.

Every change of a job is one fenced script; the Celery backend and Flower
learn of it through the publisher. The periodic scan re-drives any step a
crashed process left half-way (a result recorded but not applied, a final
state not yet published, a waiting job not yet placed), so no job is
silently dropped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from dispatcher.clock import Clock, now_ms
from dispatcher.dispatch import Decision, Dispatcher
from dispatcher.errors import UnknownJob
from dispatcher.filter import NODE_FIELDS, JobNeeds, evaluate, first_failure
from dispatcher.jobspec import JobSpec
from dispatcher.keys import Keys
from dispatcher.logs import log_event
from dispatcher.messages import JobAck, JobProgress, JobResult
from dispatcher.publish import Publisher
from dispatcher.records import as_float, as_int, as_json
from dispatcher.scripts import Scripts
from dispatcher.settings import Settings

log = logging.getLogger("dispatcher.jobs")

#: Finished job records are kept this long for inspection.
RETENTION_MS = 7 * 24 * 3600 * 1000
#: A step left pending longer than this is re-driven by the scan.
STALL_MS = 5000
#: Jobs or nodes the scan handles per kind and run.
_SCAN_BATCH = 500
#: Room left in a node frame around the payload.
_FRAME_OVERHEAD = 4096


@dataclass
class JobScanSummary:
    timed_out: list[str] = field(default_factory=list)
    expired_waiting: list[str] = field(default_factory=list)
    released_from_lost_nodes: list[str] = field(default_factory=list)
    completed: int = 0
    published: int = 0
    placed: int = 0


class Jobs:
    def __init__(self, client: redis.Redis, settings: Settings, app: Celery, clock: Clock = now_ms) -> None:
        self.client = client
        self.settings = settings
        self.app = app
        self.clock = clock
        self.keys = Keys(settings.key_prefix)
        self.scripts = Scripts(client, self.keys)
        self.dispatcher = Dispatcher(client, settings, self.scripts, clock)
        self.publisher = Publisher(app, client, self.keys)

    # --- submission (worker) ---------------------------------------------------

    def submit(self, job_id: str, fields: dict[str, Any]) -> Decision | None:
        """Validate and record a job, then try to place it. Raises InvalidJob naming the field.
        Returns None when this job id was submitted before and is already past waiting."""
        spec = JobSpec.parse(job_id, fields, self.settings.max_message_bytes - _FRAME_OVERHEAD)
        needs = JobNeeds(tuple(spec.required_models), spec.require_gpu, spec.public,
                         tuple(sorted(spec.node_selector.items())))
        now = self.clock()
        created, detail = self.scripts.enqueue_job(job_id, needs.kind, now, spec.queue_score(now), {
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
        })
        if created:
            log_event(log, "job_submitted", job_id=job_id, job_type=spec.job_type, priority=spec.priority,
                      required_models=spec.required_models, require_gpu=spec.require_gpu, public=spec.public)
        elif detail != "waiting":
            return None
        if not created or detail > 1:
            # Others wait already (or this job waited before): go through the queue in
            # its order, so that a new job never takes a slot before an older or more urgent one.
            self.dispatch_waiting()
            return None
        return self.place(job_id, needs, record_waiting=True)

    def place(self, job_id: str, needs: JobNeeds, record_waiting: bool) -> Decision:
        """Try to dispatch a waiting job. A job that must wait gets its exclusion counts
        from the indexes (cheap); the full explanation waits for a failure or a question."""
        decision = self.dispatcher.dispatch(job_id, needs)
        if decision.outcome == "waiting" and record_waiting:
            decision.eligible, decision.total, decision.exclusions = self.dispatcher.count_exclusions(needs)
            self.client.hset(self.keys.job(job_id), "last_decision", json.dumps({
                "outcome": "waiting", "at_ms": self.clock(), "eligible": decision.eligible,
                "total": decision.total, "summary": decision.summary(), **decision.exclusions}))
        if decision.outcome == "assigned" or (decision.outcome == "waiting" and record_waiting):
            self.dispatcher.record(decision)
        return decision

    def _needs(self, job_id: str) -> JobNeeds | None:
        return JobNeeds.from_values(self.client.hmget(self.keys.job(job_id), JobNeeds.FIELDS))

    # --- waiting jobs --------------------------------------------------------------

    def request_kick(self) -> None:
        """Capacity may have appeared: queue one pass over the waiting jobs (one, however many ask)."""
        if self.client.zcard(self.keys.waiting()) == 0:
            return
        if self.client.set(self.keys.kick(), "1", nx=True, px=5000):
            self.app.send_task("dispatcher.dispatch_waiting")

    def dispatch_waiting(self) -> int:
        """Place waiting jobs in order (priority, then age) while any ready node has a
        free slot. Jobs wait by kind of needs: a pass tries the first job of each kind,
        in the order of those first jobs, and drops a kind for the pass once no node
        takes it. So a pass costs one attempt per kind waiting plus one per job placed,
        however many jobs wait that no node can take."""
        self.client.delete(self.keys.kick())
        placed, given_up = 0, set()
        while self.dispatcher.free_slots_anywhere():
            kinds = self.client.zrange(self.keys.waiting_classes(), 0, len(given_up))
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
            if self.place(head[0], JobNeeds.from_json(needs_json), record_waiting=False).outcome == "assigned":
                placed += 1
            else:
                given_up.add(kind)
        return placed

    # --- frames from nodes (web) -----------------------------------------------------

    def ack(self, node_id: str, msg: JobAck) -> None:
        outcome = self.scripts.ack_job(msg.job_id, msg.attempt, node_id, self.clock())
        if outcome == "started":
            log_event(log, "job_started", job_id=msg.job_id, node_id=node_id, attempt=msg.attempt)
            self.publisher.started(msg.job_id, node_id, msg.attempt, first=True)
        elif outcome == "stale":
            log_event(log, "job_frame_ignored", job_id=msg.job_id, node_id=node_id, attempt=msg.attempt,
                      ref_type="job_ack", why="not the current attempt of this node")

    def progress(self, node_id: str, msg: JobProgress) -> None:
        outcome = self.scripts.ack_job(msg.job_id, msg.attempt, node_id, self.clock(), msg.progress, msg.message)
        if outcome == "stale":
            log_event(log, "job_frame_ignored", job_id=msg.job_id, node_id=node_id, attempt=msg.attempt,
                      ref_type="job_progress", why="not the current attempt of this node")
            return
        self.publisher.started(msg.job_id, node_id, msg.attempt, msg.progress, msg.message,
                               first=outcome == "started")

    def record_result(self, node_id: str, msg: JobResult) -> str:
        """Keep the node's result, then hand the completion to a worker."""
        error = msg.error.model_dump() if msg.error else None
        if not msg.success and error is None:
            error = {"code": "NODE_ERROR", "message": "the node reported a failure without an error",
                     "retryable": False}
        meta = json.dumps({"success": msg.success, "error": error, "duration_ms": msg.duration_ms})
        output = json.dumps(msg.output, separators=(",", ":"))
        outcome = self.scripts.record_result(msg.job_id, msg.attempt, node_id, self.clock(), meta, output)
        if outcome == "accepted":
            try:
                self.app.send_task("dispatcher.complete_job", kwargs={"job_id": msg.job_id})
            except Exception as exc:  # noqa: BLE001 - the result is recorded; the scan completes it
                log_event(log, "completion_not_queued", logging.WARNING, job_id=msg.job_id, error=str(exc))
        else:
            log_event(log, "job_frame_ignored", job_id=msg.job_id, node_id=node_id, attempt=msg.attempt,
                      ref_type="job_result", why=outcome)
        return outcome

    # --- completion, cancellation (worker) -------------------------------------------

    def _with_current_node(self, job_id: str, call: Any) -> Any:
        """Run a job+node script with the node the job is on (and the job's kind of
        needs), re-reading if it moved meanwhile (the script answers "moved", alone or
        first in a tuple)."""
        for _ in range(5):
            node_id, kind = self.client.hmget(self.keys.job(job_id), "node_id", "needs_class")
            outcome = call(node_id or "", kind or "")
            if (outcome[0] if isinstance(outcome, tuple) else outcome) != "moved":
                return outcome
        raise redis.RedisError(f"job {job_id} kept moving between nodes")

    def complete(self, job_id: str) -> str:
        """Apply the node's recorded result: finish, or retry elsewhere."""
        outcome = self._with_current_node(job_id, lambda node_id, kind: self.scripts.complete_job(
            job_id, kind, node_id, self.clock(), RETENTION_MS))
        log_event(log, "job_completed", job_id=job_id, outcome=outcome)
        self._after_release(job_id, outcome)
        return outcome

    def cancel(self, job_id: str, reason: str = "cancelled by the client") -> str:
        """Cancel a waiting or running job. Returns "cancelled", or the state of a job already over."""
        outcome, detail = self._with_current_node(job_id, lambda node_id, kind: self.scripts.cancel_job(
            job_id, kind, node_id, self.clock(), reason, RETENTION_MS))
        if outcome == "unknown":
            raise UnknownJob(f"no job {job_id}")
        if outcome == "finished":
            return detail
        log_event(log, "job_cancelled", job_id=job_id, node_id=detail or None, reason=reason)
        self.publisher.finished(job_id)
        if detail:
            self.request_kick()
        return "cancelled"

    def _after_release(self, job_id: str, outcome: str) -> None:
        """A job left its node: publish its end, or place it again; the slot may serve a waiting job."""
        if outcome in ("succeeded", "failed"):
            self.publisher.finished(job_id)
        elif outcome == "retry":
            last_error = self.client.hget(self.keys.job(job_id), "last_error") or "{}"
            self.publisher.retried(job_id, json.loads(last_error).get("message", ""))
            needs = self._needs(job_id)
            if needs is not None:
                self.place(job_id, needs, record_waiting=True)
        if outcome in ("succeeded", "failed", "retry") and self.client.exists(self.keys.waiting()):
            self.dispatch_waiting()

    # --- the scan's share (worker, beat) ----------------------------------------------

    def scan(self, now: int | None = None, lost_budget: int | None = None) -> JobScanSummary:
        now = self.clock() if now is None else now
        summary = JobScanSummary()
        k = self.keys
        # Results the nodes sent first: a result recorded in time stands, whatever a
        # timeout or a lost node would say of the attempt now.
        for job_id in self.client.zrangebyscore(k.results(), "-inf", now - STALL_MS, 0, _SCAN_BATCH):
            self.complete(job_id)
            summary.completed += 1
        explained: dict[JobNeeds, tuple[int, int, dict[str, Any]]] = {}
        for job_id in self.client.zrangebyscore(k.deadlines(), "-inf", now, 0, _SCAN_BATCH):
            self._deadline(job_id, now, summary, explained)
        lost = self.client.zrangebyscore(k.lost(), "-inf", now, 0, _SCAN_BATCH)
        for node_id in lost[:lost_budget]:
            self._release_lost(node_id, now, summary)
        for job_id in self.client.zrangebyscore(k.publish(), "-inf", now - STALL_MS, 0, _SCAN_BATCH):
            self.publisher.finished(job_id)
            summary.published += 1
        if self.client.zcard(k.waiting()):
            summary.placed = self.dispatch_waiting()
        return summary

    def _deadline(self, job_id: str, now: int, summary: JobScanSummary,
                  explained: dict[JobNeeds, tuple[int, int, dict[str, Any]]]) -> None:
        """The job's current phase timed out: it found no node in time, or its node did not finish.
        ``explained`` keeps each kind of needs' explanation for the rest of the scan (one walk
        of the fleet per kind, however many of its jobs expire together)."""
        state, node_id, attempt, timeout_ms, kind, *needs_fields = self.client.hmget(
            self.keys.job(job_id), "state", "node_id", "attempt", "timeout_ms", "needs_class", *JobNeeds.FIELDS)
        if state == "waiting":
            needs = JobNeeds.from_values(needs_fields)
            assert needs is not None and kind is not None
            if needs not in explained:
                explained[needs] = self.dispatcher.explain(needs)
            eligible, total, exclusions = explained[needs]
            decision = Decision(job_id, "failed", exclusions=exclusions, eligible=eligible, total=total)
            if self.scripts.expire_dispatch(job_id, kind, now, decision.summary(), exclusions, RETENTION_MS):
                self.dispatcher.record(decision)
                summary.expired_waiting.append(job_id)
                self.publisher.finished(job_id)
        elif state in ("assigned", "running"):
            message = (f"node {node_id} did not finish attempt {attempt} within "
                       f"{int(timeout_ms or 0) / 1000:g} s")
            outcome = self.scripts.release_job(job_id, kind or "", node_id, now, "TIMEOUT", message,
                                               cancel_on_node=True, only_if_due=True, retention_ms=RETENTION_MS)
            if outcome == "has_result":
                self.complete(job_id)
            elif outcome in ("retry", "failed"):
                summary.timed_out.append(job_id)
                log_event(log, "job_timed_out", logging.WARNING, job_id=job_id, node_id=node_id, attempt=attempt,
                          outcome=outcome)
                self._after_release(job_id, outcome)
        else:
            self.client.zrem(self.keys.deadlines(), job_id)

    def _release_lost(self, node_id: str, now: int, summary: JobScanSummary) -> None:
        status, reason = self.client.hmget(self.keys.node(node_id), "status", "status_reason")
        if status != "offline":
            self.client.zrem(self.keys.lost(), node_id)
            return
        grace_s = self.settings.reassign_grace_seconds
        if (reason or "").startswith("drain deadline passed"):
            code, message = "DRAIN_DEADLINE", f"node {node_id} was drained: {reason}"
        else:
            code = "NODE_LOST"
            message = f"node {node_id} went offline ({reason}) and did not come back within {grace_s:g} s"
        job_ids = self.client.hkeys(self.keys.assigned(node_id))
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "needs_class")
        for job_id, kind in zip(job_ids, pipe.execute()):
            outcome = self.scripts.release_job(job_id, kind or "", node_id, now, code, message, cancel_on_node=True,
                                               only_if_offline=True, retention_ms=RETENTION_MS)
            if outcome == "gone":
                self.client.hdel(self.keys.assigned(node_id), job_id)  # a leftover of a job already over
            elif outcome == "has_result":
                self.complete(job_id)
            elif outcome in ("retry", "failed"):
                summary.released_from_lost_nodes.append(job_id)
                log_event(log, "job_released", logging.WARNING, job_id=job_id, node_id=node_id, outcome=outcome,
                          why=message)
                self._after_release(job_id, outcome)
        if not self.client.hlen(self.keys.assigned(node_id)):
            self.client.zrem(self.keys.lost(), node_id)

    # --- views --------------------------------------------------------------------------

    def eligibility(self, node_id: str, needs: JobNeeds) -> dict[str, Any] | None:
        """Every filter step for one node and one job's needs, with the values compared."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.keys.node(node_id), NODE_FIELDS)
        pipe.hlen(self.keys.assigned(node_id))
        stored, assigned = pipe.execute()
        if stored[0] is None:
            return None
        s = self.settings
        steps = evaluate(dict(zip(NODE_FIELDS, stored)), assigned, needs, self.clock(),
                         int(s.heartbeat_timeout_seconds * 1000), s.resource_threshold_percent)
        failed = first_failure(steps)
        return {
            "node_id": node_id,
            "job": {"required_models": list(needs.required_models), "require_gpu": needs.require_gpu,
                    "public": needs.public, "node_selector": dict(needs.node_selector)},
            "eligible": failed is None,
            "first_failure": failed.reason if failed else None,
            "steps": [{"step": st.name, "reason": st.reason, "passed": st.passed, "detail": st.detail}
                      for st in steps],
        }

    def needs_of(self, job_id: str) -> JobNeeds:
        needs = self._needs(job_id)
        if needs is None:
            raise UnknownJob(f"no job {job_id}")
        return needs

    def view(self, job_id: str) -> dict[str, Any] | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.job(job_id))
        pipe.lrange(self.keys.job_attempts(job_id), 0, -1)
        raw, attempts = pipe.execute()
        if not raw:
            return None

        def number(name: str) -> int | None:
            return as_int(raw.get(name))
        return {
            "job_id": job_id,
            "state": raw.get("state"),
            "job_type": raw.get("job_type"),
            "priority": number("priority"),
            "required_models": as_json(raw.get("required_models"), []),
            "require_gpu": raw.get("require_gpu") == "1",
            "public": raw.get("public") == "1",
            "node_selector": as_json(raw.get("node_selector"), {}),
            "timeout_seconds": as_float(raw.get("timeout_seconds")),
            "max_attempts": number("max_attempts"),
            "payload_bytes": len(raw.get("payload") or ""),
            "attempt": number("attempt"),
            "node_id": raw.get("node_id") or None,
            "submitted_ms": number("submitted_ms"),
            "assigned_ms": number("assigned_ms"),
            "acked_ms": number("acked_ms"),
            "finished_ms": number("finished_ms"),
            "progress": as_float(raw.get("progress")),
            "progress_message": raw.get("progress_message") or None,
            "avoid_nodes": as_json(raw.get("avoid"), []),
            "outcome": as_json(raw.get("outcome"), {}) or None,
            "last_error": as_json(raw.get("last_error"), {}) or None,
            "last_decision": as_json(raw.get("last_decision"), {}) or None,
            "attempts": [as_json(a, {}) for a in attempts],
            "why_waiting": self._why_waiting(raw) if raw.get("state") == "waiting" else None,
        }

    def _why_waiting(self, raw: dict[str, str]) -> dict[str, Any]:
        """Asked about a waiting job: walk the fleet now, with examples."""
        eligible, total, exclusions = self.dispatcher.explain(JobNeeds.from_stored(raw))
        decision = Decision(raw["job_id"], "waiting", exclusions=exclusions, eligible=eligible, total=total)
        return {"eligible": eligible, "total": total, "summary": decision.summary(), **exclusions}
