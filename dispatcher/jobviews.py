"""Read-only views of jobs: one job's record, and why a node is or is not eligible for it."""

from __future__ import annotations

from typing import Any

from dispatcher.dispatch import Decision
from dispatcher.filter import NODE_FIELDS, JobNeeds, evaluate, first_failure
from dispatcher.jobs import Jobs
from dispatcher.records import as_float, as_int, as_json


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
        steps = evaluate(dict(zip(NODE_FIELDS, stored)), assigned, needs, self.jobs.clock(),
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

    def view(self, job_id: str) -> dict[str, Any] | None:
        raw = self.client.hgetall(self.keys.job(job_id))
        if not raw:
            return None

        def number(name: str) -> int | None:
            return as_int(raw.get(name))
        attempts = [a for a in as_json(raw.get("attempts"), []) if isinstance(a, dict)]
        if raw.get("state") in ("assigned", "running") and raw.get("node_id"):
            attempts.append({"attempt": number("attempt"), "node_id": raw["node_id"],
                             "assigned_ms": number("assigned_ms"), "acked_ms": number("acked_ms")})
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
            "attempts": attempts,
            "why_waiting": self._why_waiting(raw) if raw.get("state") == "waiting" else None,
        }

    def _why_waiting(self, raw: dict[str, str]) -> dict[str, Any]:
        """Asked about a waiting job: walk the fleet now, with examples."""
        eligible, total, exclusions = self.jobs.dispatcher.explain(JobNeeds.from_stored(raw))
        decision = Decision(raw["job_id"], "waiting", exclusions=exclusions, eligible=eligible, total=total)
        return {"eligible": eligible, "total": total, "summary": decision.summary(), **exclusions}
