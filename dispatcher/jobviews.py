"""Read-only views of jobs: one job's record, and why a node is or is not eligible for it."""

from __future__ import annotations

from typing import Any

from dispatcher.dispatch import Decision
from dispatcher.filter import NODE_FIELDS, JobNeeds, evaluate, first_failure
from dispatcher.fleet import job_needs
from dispatcher.jobs import Jobs
from dispatcher.records import JobRecord, NodeRecord
from dispatcher.store import text_hash
from dispatcher.vocabulary import DecisionOutcome, JobState


class JobViews:
    """Reads of job records for the HTTP API; never writes."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.client = jobs.client
        self.keys = jobs.keys

    def eligibility(self, node_id: str, needs: JobNeeds) -> dict[str, Any] | None:
        """Every filter step for one node and one job's needs, with the values compared."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.keys.node(node_id), NODE_FIELDS)
        pipe.hlen(self.keys.assigned(node_id))
        stored, assigned = pipe.execute()
        if stored[0] is None:
            return None
        s = self.jobs.settings
        node = NodeRecord.from_hash(dict(zip(NODE_FIELDS, stored, strict=True)))
        steps = evaluate(node, assigned, needs, self.jobs.clock(), int(s.heartbeat_timeout_seconds * 1000),
                         s.resource_threshold_percent)
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

    def view(self, job_id: str) -> dict[str, Any] | None:
        raw = text_hash(self.client.hgetall(self.keys.job(job_id)))
        if not raw:
            return None
        job = JobRecord.from_hash(raw)
        view = job_view(job_id, job)
        if job.state is JobState.WAITING:
            view["why_waiting"] = self._why_waiting(job_id, job)
        return view

    def _why_waiting(self, job_id: str, job: JobRecord) -> dict[str, Any]:
        """Asked about a waiting job: walk the fleet now, with examples."""
        eligible, total, exclusions = self.jobs.dispatcher.explain(job_needs(job))
        decision = Decision(job_id, DecisionOutcome.WAITING, exclusions=exclusions, eligible=eligible, total=total)
        return {"eligible": eligible, "total": total, "summary": decision.summary(), **exclusions}


def job_view(job_id: str, job: JobRecord) -> dict[str, Any]:
    """The public shape of one stored job (``why_waiting`` None: the caller adds it for a waiting job)."""
    attempts = list(job.attempts)
    if job.state in (JobState.ASSIGNED, JobState.RUNNING) and job.node_id:
        attempts.append({"attempt": job.attempt, "node_id": job.node_id, "assigned_ms": job.assigned_ms,
                         "acked_ms": job.acked_ms})
    return {
        "job_id": job_id,
        "state": job.state_text,
        "job_type": job.job_type,
        "priority": job.priority,
        "required_models": job.required_models,
        "require_gpu": job.require_gpu,
        "public": job.public,
        "node_selector": job.node_selector,
        "timeout_seconds": job.timeout_seconds,
        "max_attempts": job.max_attempts,
        "payload_bytes": len(job.payload or ""),
        "attempt": job.attempt,
        "node_id": job.node_id,
        "submitted_ms": job.submitted_ms,
        "assigned_ms": job.assigned_ms,
        "acked_ms": job.acked_ms,
        "finished_ms": job.finished_ms,
        "progress": job.progress,
        "progress_message": job.progress_message,
        "avoid_nodes": job.avoid,
        "outcome": job.outcome,
        "last_error": job.last_error,
        "last_decision": job.last_decision,
        "attempts": attempts,
        "why_waiting": None,
    }
