"""The periodic scan's share of jobs: results a dead worker held, what timed out, and
what a lost node held."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dispatcher.completions import Completions
from dispatcher.dispatch import Decision
from dispatcher.errors import JobMoved
from dispatcher.filter import JobNeeds
from dispatcher.joblist import JobList
from dispatcher.jobs import RETENTION_MS, AttemptOutcome, Jobs
from dispatcher.logs import log_event
from dispatcher.scripts import DispatchExpired, OutOfAttempts, Reply, Requeued
from dispatcher.store import optional_texts, texts
from dispatcher.vocabulary import DecisionOutcome, FailureCode, JobState, NodeStatus

log = logging.getLogger("dispatcher.recovery")

#: Jobs or nodes the scan handles per kind and run.
_SCAN_BATCH = 500


@dataclass
class JobScanSummary:
    #: Results applied by the scan: a dead worker's, or none had read yet.
    results_applied: int = 0
    timed_out: list[str] = field(default_factory=list)
    expired_waiting: list[str] = field(default_factory=list)
    released_from_lost_nodes: list[str] = field(default_factory=list)
    placed: int = 0


class Recovery:
    """The scan's work on jobs (beat runs it through ``dispatcher.scan_nodes``)."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.client = jobs.client
        self.keys = jobs.keys
        self.scripts = jobs.scripts
        self.completions = Completions(jobs, consumer="scan")

    def scan(self, now: int | None = None, lost_budget: int | None = None) -> JobScanSummary:
        now = self.jobs.clock() if now is None else now
        summary = JobScanSummary()
        k = self.keys
        # Results first: one that arrived in time ends its job before the deadline is looked at.
        summary.results_applied = self.completions.recover()
        self.completions.trim()
        explained: dict[JobNeeds, tuple[int, int, dict[str, Any]]] = {}
        for job_id in texts(self.client.zrangebyscore(k.deadlines(), "-inf", now, 0, _SCAN_BATCH)):
            self._deadline(job_id, now, summary, explained)
        lost = texts(self.client.zrangebyscore(k.lost(), "-inf", now, 0, _SCAN_BATCH))
        for node_id in lost[:lost_budget]:
            self._release_lost(node_id, now, summary)
        if self.client.zcard(k.waiting()):
            summary.placed = self.jobs.dispatch_waiting()
        # The finished-job indexes are trimmed here, not by each job's end: no command per job.
        JobList(self.client, k).trim(now, RETENTION_MS)
        return summary

    def _deadline(self, job_id: str, now: int, summary: JobScanSummary,
                  explained: dict[JobNeeds, tuple[int, int, dict[str, Any]]]) -> None:
        """The job's current phase timed out: it found no node in time, or its node did not finish.
        ``explained`` keeps each kind of needs' explanation for the rest of the scan (one walk
        of the fleet per kind, however many of its jobs expire together)."""
        state, node_id, attempt, timeout_ms, kind, *needs_fields = optional_texts(self.client.hmget(
            self.keys.job(job_id), "state", "node_id", "attempt", "timeout_ms", "needs_class", *JobNeeds.FIELDS))
        if state == JobState.WAITING:
            needs = JobNeeds.from_values(needs_fields)
            assert needs is not None and kind is not None
            if needs not in explained:
                explained[needs] = self.jobs.dispatcher.explain(needs)
            eligible, total, exclusions = explained[needs]
            decision = Decision(job_id, DecisionOutcome.FAILED, exclusions=exclusions, eligible=eligible, total=total)
            expired = self.scripts.expire_dispatch(job_id, kind, now, decision.summary(), exclusions, RETENTION_MS)
            if isinstance(expired, DispatchExpired):
                self.jobs.dispatcher.record(decision)
                summary.expired_waiting.append(job_id)
                self.jobs.publisher.finished(job_id, expired.outcome)
        elif state in (JobState.ASSIGNED, JobState.RUNNING):
            # (a job on a node has its node_id; without one, the script finds the job moved: with None
            # it would be called without the node's keys)
            node_id = node_id or ""
            message = (f"node {node_id} did not finish attempt {attempt} within "
                       f"{int(timeout_ms or 0) / 1000:g} s")
            # A timeout counts against the node, as its own failures do.
            try:
                reply = self.scripts.release_job(job_id, kind or "", node_id, now, FailureCode.TIMEOUT, message,
                                                 cancel_on_node=True, only_if_due=True, retention_ms=RETENTION_MS,
                                                 job_health=self.jobs.job_health)
            except JobMoved:
                return  # on another node since it was read: that attempt's own deadline counts
            if isinstance(reply, (Requeued, OutOfAttempts)):
                self.jobs.node_degraded(node_id, reply.degraded)
                summary.timed_out.append(job_id)
                log_event(log, "job_timed_out", logging.WARNING, job_id=job_id, node_id=node_id, attempt=attempt,
                          outcome=_released(reply))
                self.jobs.after_release(job_id, reply)
        else:
            self.client.zrem(self.keys.deadlines(), job_id)

    def _release_lost(self, node_id: str, now: int, summary: JobScanSummary) -> None:
        status, reason, cause = optional_texts(self.client.hmget(self.keys.node(node_id), "status", "status_reason",
                                                                 "offline_cause"))
        if status != NodeStatus.OFFLINE:
            self.client.zrem(self.keys.lost(), node_id)
            return
        grace_s = self.jobs.settings.reassign_grace_seconds
        # Decided on the code the script that took the node offline recorded; the reason is for people.
        if cause == FailureCode.DRAIN_DEADLINE:
            code, message = FailureCode.DRAIN_DEADLINE, f"node {node_id} was drained: {reason}"
        else:
            code = FailureCode.NODE_LOST
            message = f"node {node_id} went offline ({reason}) and did not come back within {grace_s:g} s"
        job_ids = texts(self.client.hkeys(self.keys.assigned(node_id)))
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "needs_class")
        for job_id, kind in zip(job_ids, pipe.execute(), strict=True):
            try:
                reply = self.scripts.release_job(job_id, kind or "", node_id, now, code, message,
                                                 cancel_on_node=True, only_if_offline=True, retention_ms=RETENTION_MS)
            except JobMoved:
                continue  # on another node now
            if reply is Reply.GONE:
                self.client.hdel(self.keys.assigned(node_id), job_id)  # a leftover of a job already over
            elif isinstance(reply, (Requeued, OutOfAttempts)):
                summary.released_from_lost_nodes.append(job_id)
                log_event(log, "job_released", logging.WARNING, job_id=job_id, node_id=node_id,
                          outcome=_released(reply), why=message)
                self.jobs.after_release(job_id, reply)
        if not self.client.hlen(self.keys.assigned(node_id)):
            self.client.zrem(self.keys.lost(), node_id)


def _released(reply: Requeued | OutOfAttempts) -> AttemptOutcome:
    """What became of a released job: it waits again, or it failed."""
    return AttemptOutcome.RETRY if isinstance(reply, Requeued) else AttemptOutcome.FAILED
