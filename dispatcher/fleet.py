"""Read-only views of the fleet for the HTTP API, the page, the CLI and status reports."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
from pydantic import ValidationError

from dispatcher.clock import Clock, now_ms
from dispatcher.filter import JobNeeds, evaluate
from dispatcher.keys import Keys
from dispatcher.vocabulary import NodeStatus
from dispatcher.messages import NodeStatusMessage
from dispatcher.records import as_float, as_int, as_json
from dispatcher.settings import Settings

#: Ids looked at per listed node when listing one status (see ``Fleet.nodes``).
_FILTER_FACTOR = 10


def node_view(raw: dict[str, str], assigned: list[str], now: int) -> dict[str, Any]:
    """The public shape of one stored node."""
    last_heartbeat = as_int(raw.get("last_heartbeat_ms"))
    window = raw.get("window", "")
    return {
        "node_id": raw["node_id"],
        "status": raw.get("status"),
        "previous_status": raw.get("previous_status") or None,
        "reason": raw.get("status_reason", ""),
        "status_since_ms": as_int(raw.get("status_since_ms")),
        "registered_at_ms": as_int(raw.get("registered_at_ms")),
        "last_heartbeat_ms": last_heartbeat,
        "last_heartbeat_age_s": None if last_heartbeat is None else round((now - last_heartbeat) / 1000, 1),
        "connected": raw.get("connected") == "1",
        "web_id": raw.get("web_id"),
        "version": raw.get("version", ""),
        "capability_schema_version": raw.get("capability_schema_version", ""),
        "advanced_features": as_json(raw.get("advanced_features"), {}),
        "hardware": as_json(raw.get("hardware"), {}),
        "gpu_available": raw.get("gpu_available") == "1",
        "resource_usage": {
            "cpu_percent": as_float(raw.get("cpu_percent")),
            "gpu_percent": as_float(raw.get("gpu_percent")),
            "mem_percent": as_float(raw.get("mem_percent")),
            "running_jobs": as_int(raw.get("running_jobs")),
        },
        "models": [m for m in as_json(raw.get("models"), []) if isinstance(m, dict)],
        "labels": as_json(raw.get("labels"), {}),
        "accept_public_jobs": raw.get("accept_public") == "1",
        "max_concurrent_jobs": as_int(raw.get("max_concurrent_jobs")),
        "assigned_jobs": sorted(assigned),
        "health": {
            "window": window,
            "window_failures": window.count("0"),
            "consecutive_ok": as_int(raw.get("consecutive_ok")) or 0,
            "consecutive_fail": as_int(raw.get("consecutive_fail")) or 0,
            "last_healthy": {"1": True, "0": False}.get(raw.get("last_healthy", "")),
            "last_reason": raw.get("last_health_reason", ""),
        },
        "job_health": _job_health_view(raw, now),
        "running_jobs_mismatch": _mismatch_view(raw, len(assigned)),
        "drain": _drain_view(raw, len(assigned)),
        "cordon": _cordon_view(raw),
    }


def _cordon_view(raw: dict[str, str]) -> dict[str, Any] | None:
    """Set while an operator keeps the node from new jobs (its status is unchanged)."""
    if raw.get("cordoned") != "1":
        return None
    return {"reason": raw.get("cordon_reason") or "", "requested_by": raw.get("cordoned_by") or "",
            "at_ms": as_int(raw.get("cordoned_ms"))}


def _job_health_view(raw: dict[str, str], now: int) -> dict[str, Any]:
    """The node's job window: its last outcomes, oldest first ("1" good, "0" its own failure:
    a node_fault error or a timeout), and the JobFailures cool-down while it lasts."""
    window = raw.get("job_window", "")
    cooldown_until = as_int(raw.get("job_cooldown_until_ms"))
    return {
        "window": window,
        "window_failures": window.count("0"),
        "consecutive_failures": len(window) - len(window.rstrip("0")),
        "last_failure": as_json(raw.get("job_last_failure"), {}) or None,
        "cooldown_until_ms": cooldown_until if cooldown_until and cooldown_until > now else None,
    }


def _mismatch_view(raw: dict[str, str], assigned: int) -> dict[str, Any] | None:
    """The node's running_jobs disagreeing with its assigned jobs, while an episode lasts
    (field ``running_mismatch``: heartbeats in a row, then ":" and when the episode began)."""
    beats, _, since = raw.get("running_mismatch", "").partition(":")
    if as_int(since) is None:
        return None
    return {"since_ms": as_int(since), "heartbeats": as_int(beats) or 0,
            "running_jobs": as_int(raw.get("running_jobs")), "assigned_jobs": assigned}


def _drain_view(raw: dict[str, str], jobs_left: int) -> dict[str, Any] | None:
    if not raw.get("drain_requested_ms"):
        return None
    return {
        "in_progress": raw.get("drain_pending") == "1",
        "jobs_left": jobs_left,
        "requested_by": raw.get("drain_requested_by"),
        "reason": raw.get("drain_reason"),
        "requested_at_ms": as_int(raw.get("drain_requested_ms")),
        "deadline_ms": as_int(raw.get("drain_deadline_ms")),
        "jobs_at_start": as_int(raw.get("drain_jobs_at_start")),
        "ended_at_ms": as_int(raw.get("drain_ended_ms")),
        "outcome": raw.get("drain_outcome") or None,
    }


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
        view = node_view(raw, assigned, self.clock())
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
            ids = self.client.zrange(self.keys.nodes(), start, "+", bylex=True, offset=0, num=limit + 1)
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
            ids = self.client.zrange(self.keys.nodes(), start, "+", bylex=True, offset=0, num=min(budget, 500))
            if not ids:
                return page, None
            for node_id, member in zip(ids, self.client.smismember(self.keys.status_set(status), ids)):
                if member:
                    page.append(node_id)
                    if len(page) == limit:
                        return page, node_id
            budget -= len(ids)
            start = f"({ids[-1]}"
        return page, start[1:]

    def _raw(self, node_ids: list[str]) -> dict[str, tuple[dict[str, str], list[str]]]:
        """Each node's stored hash and assigned job ids, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for node_id in node_ids:
            pipe.hgetall(self.keys.node(node_id))
            pipe.hkeys(self.keys.assigned(node_id))
        replies = pipe.execute()
        return {node_id: (replies[2 * i], replies[2 * i + 1]) for i, node_id in enumerate(node_ids)}

    def _views(self, node_ids: list[str],
               raws: dict[str, tuple[dict[str, str], list[str]]] | None = None) -> dict[str, dict[str, Any] | None]:
        raws = self._raw(node_ids) if raws is None else raws
        now = self.clock()
        return {node_id: node_view(raw, assigned, now) if raw else None for node_id, (raw, assigned) in raws.items()}

    def counts_by_status(self) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for status in NodeStatus:
            pipe.scard(self.keys.status_set(status))
        return dict(zip(NodeStatus, pipe.execute()))

    def recent_transitions(self, limit: int = 50) -> list[dict[str, Any]]:
        return [as_json(e, {}) for e in self.client.lrange(self.keys.transitions(), 0, limit - 1)]

    def last_scan(self) -> dict[str, Any]:
        raw = self.client.hgetall(self.keys.scan_state())
        return {k: as_int(v) for k, v in raw.items()}

    def why_idle(self, raw: dict[str, str], assigned: int, head: JobNeeds | None) -> list[str]:
        """Why a ready node gets no job: the steps it fails for any job, then those it
        fails only for the first waiting job (``ResourceThresholdExceeded: gpu 80% >= 25%``)."""
        s = self.settings

        def failing(needs: JobNeeds) -> list[str]:
            steps = evaluate(raw, assigned, needs, self.clock(), int(s.heartbeat_timeout_seconds * 1000),
                             s.resource_threshold_percent)
            return [f"{step.reason}: {step.detail}" for step in steps if not step.passed]
        reasons = failing(JobNeeds())
        if head is not None:
            reasons += [f"first waiting job: {text}" for text in failing(head) if text not in reasons]
        return reasons

    def _first_waiting(self) -> JobNeeds | None:
        head = self.client.zrange(self.keys.waiting(), 0, 0)
        if not head:
            return None
        return JobNeeds.from_values(self.client.hmget(self.keys.job(head[0]), JobNeeds.FIELDS))

    def status_reports(self, node_ids: list[str]) -> dict[str, NodeStatusMessage]:
        """The periodic node_status frame of each node, with its health summary, its
        jobs and, for a ready node, why it gets no (more) work."""
        reports = {}
        raws = self._raw(node_ids)
        head = self._first_waiting()
        for node_id, view in self._views(node_ids, raws).items():
            if view is None:
                continue
            idle = None
            if view["status"] == "ready":
                idle = self.why_idle(raws[node_id][0], len(view["assigned_jobs"]), head)
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
