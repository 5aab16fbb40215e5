"""Read-only views of the fleet for the HTTP API, the page, the CLI and status reports."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
from pydantic import ValidationError

from dispatcher.clock import Clock, now_ms
from dispatcher.filter import JobNeeds, evaluate
from dispatcher.keys import Keys
from dispatcher.messages import NodeStatusMessage
from dispatcher.records import JobRecord, NodeRecord, as_int, as_json
from dispatcher.settings import Settings
from dispatcher.store import optional_texts, text_hash, texts
from dispatcher.vocabulary import NodeStatus

#: Ids looked at per listed node when listing one status (see ``Fleet.nodes``).
_FILTER_FACTOR = 10


def node_view(node: NodeRecord, assigned: list[str], now: int) -> dict[str, Any]:
    """The public shape of one stored node."""
    last_heartbeat = node.last_heartbeat_ms
    return {
        "node_id": node.node_id,
        "status": node.status_text,
        "previous_status": node.previous_status_text,
        "reason": node.status_reason,
        "status_since_ms": node.status_since_ms,
        "registered_at_ms": node.registered_at_ms,
        "last_heartbeat_ms": last_heartbeat,
        "last_heartbeat_age_s": _age_s(now, last_heartbeat),
        "connected": node.connected,
        "web_id": node.web_id,
        "version": node.version,
        "capability_schema_version": node.capability_schema_version,
        "advanced_features": node.advanced_features,
        "hardware": node.hardware,
        "gpu_available": node.gpu_available,
        "resource_usage": {
            "cpu_percent": node.cpu_percent,
            "gpu_percent": node.gpu_percent,
            "mem_percent": node.mem_percent,
            "running_jobs": node.running_jobs,
        },
        "models": node.models,
        "labels": node.labels,
        "accept_public_jobs": node.accept_public,
        "max_concurrent_jobs": node.max_concurrent_jobs,
        "assigned_jobs": sorted(assigned),
        "health": {
            "window": node.window,
            "window_failures": node.window.count("0"),
            "consecutive_ok": node.consecutive_ok,
            "consecutive_fail": node.consecutive_fail,
            "last_healthy": node.last_healthy,
            "last_reason": node.last_health_reason,
        },
        "job_health": _job_health_view(node, now),
        "running_jobs_mismatch": _mismatch_view(node, len(assigned)),
        "drain": _drain_view(node, len(assigned)),
        "cordon": _cordon_view(node),
    }


def _age_s(now: int, at_ms: int | None) -> float | None:
    """Seconds since ``at_ms``, to a tenth; None when unknown (or past a float's range: a corrupt record's)."""
    if at_ms is None:
        return None
    try:
        return round((now - at_ms) / 1000, 1)
    except OverflowError:
        return None


def _cordon_view(node: NodeRecord) -> dict[str, Any] | None:
    """Set while an operator keeps the node from new jobs (its status is unchanged)."""
    if not node.cordoned:
        return None
    return {"reason": node.cordon_reason, "requested_by": node.cordoned_by, "at_ms": node.cordoned_ms}


def _job_health_view(node: NodeRecord, now: int) -> dict[str, Any]:
    """The node's job window: its last outcomes, oldest first ("1" good, "0" its own failure:
    a node_fault error or a timeout), and the JobFailures cool-down while it lasts."""
    window = node.job_window
    cooldown_until = node.job_cooldown_until_ms
    return {
        "window": window,
        "window_failures": window.count("0"),
        "consecutive_failures": len(window) - len(window.rstrip("0")),
        "last_failure": node.job_last_failure,
        "cooldown_until_ms": cooldown_until if cooldown_until and cooldown_until > now else None,
    }


def _mismatch_view(node: NodeRecord, assigned: int) -> dict[str, Any] | None:
    """The node's running_jobs disagreeing with its assigned jobs, while an episode lasts
    (from the heartbeat that began it)."""
    if node.mismatch_since_ms is None:
        return None
    return {"since_ms": node.mismatch_since_ms, "heartbeats": node.mismatch_heartbeats,
            "running_jobs": node.running_jobs, "assigned_jobs": assigned}


def _drain_view(node: NodeRecord, jobs_left: int) -> dict[str, Any] | None:
    if not node.drain_requested:
        return None
    return {
        "in_progress": node.drain_pending,
        "jobs_left": jobs_left,
        "requested_by": node.drain_requested_by,
        "reason": node.drain_reason,
        "requested_at_ms": node.drain_requested_ms,
        "deadline_ms": node.drain_deadline_ms,
        "jobs_at_start": node.drain_jobs_at_start,
        "ended_at_ms": node.drain_ended_ms,
        "outcome": node.drain_outcome,
    }


def job_needs(job: JobRecord) -> JobNeeds:
    """A job's needs as the filter reads them, from its record: what its record cannot say
    (a model that is not a name, a label value that is not a text) it is taken not to ask.
    (``JobNeeds.from_stored`` refuses such a record: a view must not.)"""
    return JobNeeds(tuple(m for m in job.required_models if isinstance(m, str)), job.require_gpu, job.public,
                    tuple(sorted((k, v) for k, v in job.node_selector.items() if isinstance(v, str))))


class Fleet:
    """Reads of node records; never writes."""

    def __init__(self, client: redis.Redis, settings: Settings, clock: Clock = now_ms, *,
                 keys: Keys | None = None) -> None:
        self.client = client
        self.settings = settings
        self.keys = keys or Keys(settings.key_prefix)  # (shared when dispatcher/core.py builds it)
        self.clock = clock

    def node(self, node_id: str, transitions: int = 20) -> dict[str, Any] | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.node(node_id))
        pipe.hkeys(self.keys.assigned(node_id))
        pipe.lrange(self.keys.node_transitions(node_id), 0, transitions - 1)
        raw, assigned, history = pipe.execute()
        if not raw:
            return None
        view = node_view(NodeRecord.from_hash(raw), assigned, self.clock())
        view["transitions"] = [as_json(entry, {}) for entry in history]
        return view

    def page(self, status: str | None = None, limit: int = 100,
             after: str | None = None) -> tuple[list[str], str | None]:
        """The ids of one page of nodes in id order, after the node id ``after``, and the
        cursor of the next page (None on the last). With a status, at most
        ``_FILTER_FACTOR`` x ``limit`` ids are looked at per page, so a rare status costs
        more pages, never a long answer."""
        start = f"({after}" if after else "-"
        if status is None:
            ids = texts(self.client.zrange(self.keys.nodes(), start, "+", bylex=True, offset=0, num=limit + 1))
            return ids[:limit], (ids[limit - 1] if len(ids) > limit else None)
        return self._page_with_status(status, start, limit)

    def views_in_chunks(self, node_ids: list[str], chunk: int = 50) -> Iterator[list[dict[str, Any]]]:
        """The views of these nodes, a pipeline per ``chunk``: the caller can yield the
        loop between chunks, so a long answer never holds up the sessions."""
        for start in range(0, len(node_ids), chunk):
            yield [v for v in self._views(node_ids[start:start + chunk]).values() if v is not None]

    def _page_with_status(self, status: str, start: str, limit: int) -> tuple[list[str], str | None]:
        page: list[str] = []
        budget = _FILTER_FACTOR * limit
        while budget > 0:
            ids = texts(self.client.zrange(self.keys.nodes(), start, "+", bylex=True, offset=0, num=min(budget, 500)))
            if not ids:
                return page, None
            for node_id, member in zip(ids, self.client.smismember(self.keys.status_set(status), ids), strict=True):
                if member:
                    page.append(node_id)
                    if len(page) == limit:
                        return page, node_id
            budget -= len(ids)
            start = f"({ids[-1]}"
        return page, start[1:]

    def _records(self, node_ids: list[str]) -> dict[str, tuple[NodeRecord | None, list[str]]]:
        """Each node's record (None: no such node) and assigned job ids, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for node_id in node_ids:
            pipe.hgetall(self.keys.node(node_id))
            pipe.hkeys(self.keys.assigned(node_id))
        replies = pipe.execute()
        return {node_id: (NodeRecord.from_hash(replies[2 * i]) if replies[2 * i] else None, replies[2 * i + 1])
                for i, node_id in enumerate(node_ids)}

    def _views(self, node_ids: list[str],
               records: dict[str, tuple[NodeRecord | None, list[str]]] | None = None,
               ) -> dict[str, dict[str, Any] | None]:
        records = self._records(node_ids) if records is None else records
        now = self.clock()
        return {node_id: None if node is None else node_view(node, assigned, now)
                for node_id, (node, assigned) in records.items()}

    def counts_by_status(self) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for status in NodeStatus:
            pipe.scard(self.keys.status_set(status))
        return dict(zip(NodeStatus, pipe.execute(), strict=True))

    def recent_transitions(self, limit: int = 50) -> list[dict[str, Any]]:
        return [as_json(e, {}) for e in texts(self.client.lrange(self.keys.transitions(), 0, limit - 1))]

    def last_scan(self) -> dict[str, Any]:
        raw = text_hash(self.client.hgetall(self.keys.scan_state()))
        return {k: as_int(v) for k, v in raw.items()}

    def why_idle(self, node: NodeRecord, assigned: int, head: JobNeeds | None) -> list[str]:
        """Why a ready node gets no job: the steps it fails for any job, then those it
        fails only for the first waiting job (``ResourceThresholdExceeded: gpu 80% >= 25%``)."""
        s = self.settings

        def failing(needs: JobNeeds) -> list[str]:
            steps = evaluate(node, assigned, needs, self.clock(), int(s.heartbeat_timeout_seconds * 1000),
                             s.resource_threshold_percent)
            return [f"{step.reason}: {step.detail}" for step in steps if not step.passed]
        reasons = failing(JobNeeds())
        if head is not None:
            reasons += [f"first waiting job: {text}" for text in failing(head) if text not in reasons]
        return reasons

    def _first_waiting(self) -> JobNeeds | None:
        head = texts(self.client.zrange(self.keys.waiting(), 0, 0))
        if not head:
            return None
        values = optional_texts(self.client.hmget(self.keys.job(head[0]), JobNeeds.FIELDS))
        if values[0] is None:
            return None
        return job_needs(JobRecord.from_hash(dict(zip(JobNeeds.FIELDS, values, strict=True))))

    def status_reports(self, node_ids: list[str]) -> dict[str, NodeStatusMessage]:
        """The periodic node_status frame of each node, with its health summary, its
        jobs and, for a ready node, why it gets no (more) work."""
        reports = {}
        records = self._records(node_ids)
        head = self._first_waiting()
        for node_id, view in self._views(node_ids, records).items():
            node = records[node_id][0]
            if view is None or node is None:
                continue
            idle = None
            if node.status is NodeStatus.READY:
                idle = self.why_idle(node, len(view["assigned_jobs"]), head)
            try:
                reports[node_id] = NodeStatusMessage(
                    node_id=node_id,
                    status=view["status"],
                    previous_status=view["previous_status"],
                    reason=view["reason"],
                    timestamp=self.clock(),
                    periodic=True,
                    health=view["health"],
                    assigned_jobs=view["assigned_jobs"],
                    not_eligible=idle,
                )
            except ValidationError:
                continue  # a record no report can be made of; the others go out
        return reports
