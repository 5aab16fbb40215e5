"""The views' parsing of stored hashes as it was before the codecs (commit 9ca9901), kept
verbatim so that tests/test_records.py can show the codecs changed no answer: the same
stored text gives the same JSON, byte for byte.

Not used by the dispatcher. Only the parts that read a hash are here (the Redis reads
around them, and the fleet walk of ``why_waiting``, are not).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dispatcher.filter import JobNeeds, Step
from dispatcher.records import as_float, as_int, as_json
from dispatcher.vocabulary import FINAL_STATES


# --- dispatcher/fleet.py ---------------------------------------------------------------

def node_view(raw: dict[str, str], assigned: list[str], now: int) -> dict[str, Any]:
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
    if raw.get("cordoned") != "1":
        return None
    return {"reason": raw.get("cordon_reason") or "", "requested_by": raw.get("cordoned_by") or "",
            "at_ms": as_int(raw.get("cordoned_ms"))}


def _job_health_view(raw: dict[str, str], now: int) -> dict[str, Any]:
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


# --- dispatcher/jobviews.py (JobViews.view, without why_waiting's walk of the fleet) ----

def job_view(job_id: str, raw: dict[str, str]) -> dict[str, Any]:
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
        "why_waiting": None,
    }


# --- dispatcher/joblist.py (JobList._views and _running, for one job) --------------------

LISTED_FIELDS = ("state", "job_type", "priority", "required_models", "node_id", "attempt", "max_attempts",
                 "submitted_ms", "assigned_ms", "finished_ms", "progress", "outcome")


def listed_view(job_id: str, raw: dict[str, str | None]) -> dict[str, Any] | None:
    if raw["state"] is None:
        return None
    return {
        "job_id": job_id,
        "state": raw["state"],
        "job_type": raw["job_type"],
        "priority": as_int(raw["priority"]),
        "required_models": as_json(raw["required_models"], []),
        "node_id": raw["node_id"] or None,
        "attempt": as_int(raw["attempt"]),
        "max_attempts": as_int(raw["max_attempts"]),
        "submitted_ms": as_int(raw["submitted_ms"]),
        "assigned_ms": as_int(raw["assigned_ms"]),
        "finished_ms": as_int(raw["finished_ms"]),
        "progress": as_float(raw["progress"]),
        "outcome": as_json(raw["outcome"], {}) or None,
    }


def running_position(state: str | None, submitted: str | None) -> int | None:
    """The submission time a running job is listed by, None for a job not running."""
    return as_int(submitted) or 0 if state in ("assigned", "running") else None


# --- dispatcher/metrics.py (node_series, for one node) ------------------------------------

METRIC_FIELDS = ("status", "max_concurrent_jobs", *(f"finished_{state}" for state in FINAL_STATES))


def node_samples(record: dict[str, str | None]) -> tuple[str, int, list[int]] | None:
    """(status label, slots, finished by state), or None for a node deleted meanwhile."""
    if record["status"] is None:
        return None
    return (record["status"], int(record["max_concurrent_jobs"] or 0),
            [int(record[f"finished_{state}"] or 0) for state in FINAL_STATES])


# --- dispatcher/filter.py -----------------------------------------------------------------

def _number(value: str | None) -> float:
    return as_float(value) or 0.0


def evaluate(node: Mapping[str, str], assigned: int, needs: JobNeeds, now_ms: int,
             heartbeat_timeout_ms: int, resource_threshold: float) -> list[Step]:
    status = node.get("status") or "unknown"
    silent_ms = now_ms - _number(node.get("last_seen_ms"))
    labels = as_json(node.get("labels"), {})
    ready_models = {m.get("model_id") for m in as_json(node.get("models"), []) if isinstance(m, dict)
                    and m.get("status") == "ready"}
    missing_labels = [f"{k}={v}" for k, v in needs.node_selector if labels.get(k) != v]
    missing_models = [m for m in needs.required_models if m not in ready_models]
    max_jobs = int(_number(node.get("max_concurrent_jobs")) or 1)
    usage = {"cpu": _number(node.get("cpu_percent")), "gpu": _number(node.get("gpu_percent")),
             "mem": _number(node.get("mem_percent"))}
    over = [f"{k} {v:g}% >= {resource_threshold:g}%" for k, v in usage.items() if v >= resource_threshold]
    return [
        Step("status", "StatusNotReady", status == "ready", f"status {status}"),
        Step("online", "StatusNotReady", silent_ms < heartbeat_timeout_ms,
             f"last heard {silent_ms / 1000:.1f} s ago (timeout {heartbeat_timeout_ms / 1000:g} s)"),
        Step("public_pool", "NotInPublicPool", not needs.public or node.get("accept_public") == "1",
             "job is not public" if not needs.public else
             f"accepts public jobs: {'yes' if node.get('accept_public') == '1' else 'no'}"),
        Step("node_selector", "NodeSelectorMismatch", not missing_labels,
             f"missing labels {', '.join(missing_labels)}" if missing_labels else
             ("labels match" if needs.node_selector else "no selector")),
        Step("gpu", "GpuUnavailable", not needs.require_gpu or node.get("gpu_available") == "1",
             "job needs no GPU" if not needs.require_gpu else
             f"GPU available: {'yes' if node.get('gpu_available') == '1' else 'no'}"),
        Step("models", "ModelNotAvailable", not missing_models,
             f"not ready: {', '.join(missing_models)}" if missing_models else
             (f"ready: {', '.join(needs.required_models)}" if needs.required_models else "no models required")),
        Step("cordon", "NodeCordoned", node.get("cordoned") != "1",
             f"cordoned: {node.get('cordon_reason') or 'no reason given'}" if node.get("cordoned") == "1"
             else "not cordoned"),
        Step("capacity", "CapacityExceeded", assigned < max_jobs, f"{assigned}/{max_jobs} slots used"),
        Step("resources", "ResourceThresholdExceeded", not over,
             "; ".join(over) if over else
             f"cpu {usage['cpu']:g}%, gpu {usage['gpu']:g}%, mem {usage['mem']:g}% < {resource_threshold:g}%"),
    ]
