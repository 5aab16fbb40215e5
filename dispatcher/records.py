"""Reading what Redis stores, for every view: no stored text can make a view fail.

Records are written by the scripts from validated frames, but a view must not
trust that: an older version, an operator's HSET or a bug may leave "1e+17",
"abc" or half a JSON text behind, and one bad record must not take down
``/api/nodes``, the page, the CLI or the status ticker for every node.

One codec per stored hash: ``NodeRecord`` (the node hash, ``Keys.node``) and
``JobRecord`` (the job hash, ``Keys.job``). ``from_hash`` takes an HGETALL, or an
HMGET zipped with its field names (None: absent), and never raises: a field that is
absent or cannot be read is None (a text: "", a flag: False, a count: 0, a JSON
object or list: empty), as each field's comment says. Views decide on the parsed
attributes and show them; ``FIELDS`` names every field, for HMGET.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from dispatcher.vocabulary import FINAL_STATES, FailureCode, JobState, NodeStatus

#: A stored hash as read: an HGETALL, or an HMGET zipped with its names (None: absent).
Stored = Mapping[str, "str | None"]
E = TypeVar("E", bound=StrEnum)


def as_float(value: str | None) -> float | None:
    """A finite number, or None for anything else."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def as_int(value: str | None) -> int | None:
    """An integer (``"1e+17"`` included, as Lua writes large numbers), or None."""
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        number = as_float(value)
        return None if number is None else int(number)


def as_json(value: str | None, default: Any) -> Any:
    """Parsed JSON of the default's type, or the default."""
    if not value:
        return default
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):  # (RecursionError: "[[[[..." nested too deep)
        return default
    return parsed if isinstance(parsed, type(default)) else default


def _enum(kind: type[E], value: str | None) -> E | None:
    """The member of ``kind`` the text names, or None (absent, or a word this version does not know)."""
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        return None


def _dicts(value: str | None) -> list[dict[str, Any]]:
    """A JSON list's objects (anything else in it is dropped)."""
    return [item for item in as_json(value, []) if isinstance(item, dict)]


@dataclass(frozen=True)
class NodeRecord:
    """A node's hash (lua/register_node.lua, record_heartbeat.lua, the transition in _node.lua,
    drain_node.lua, cordon_node.lua, _nodejob.lua's job window, count_node_jobs.lua)."""

    # -- the node and its session (register_node, close_session)
    node_id: str | None = None
    secret_hash: str | None = field(default=None, repr=False)
    session_id: str | None = None
    web_id: str | None = None  # (None: absent; shown as stored)
    connected: bool = False  # "1"
    session_started_ms: int | None = None
    registered_at_ms: int | None = None
    # -- what the node registered with
    version: str = ""
    capability_schema_version: str = ""
    advanced_features: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    gpu_count: int = 0
    gpu_available: bool = False  # "1" (record_heartbeat: only with a GPU)
    models: list[dict[str, Any]] = field(default_factory=list)  # its objects only
    labels: dict[str, Any] = field(default_factory=dict)
    accept_public: bool = False  # "1"
    max_concurrent_jobs: int | None = None
    # -- status (_node.lua's transition): the enum, None for a word this version does not
    #    know; ``*_text`` as stored, which views show
    status: NodeStatus | None = None
    status_text: str | None = None
    previous_status: NodeStatus | None = None
    previous_status_text: str | None = None  # ("" for a new node: None)
    status_reason: str = ""
    #: Why an offline node went offline, as a code recovery decides on (``status_reason`` is for people).
    offline_cause: FailureCode | None = None
    status_since_ms: int | None = None
    # -- heartbeats and their health window (record_heartbeat)
    last_seen_ms: int | None = None
    last_heartbeat_ms: int | None = None
    cpu_percent: float | None = None
    gpu_percent: float | None = None  # ("" when the node has no GPU: None)
    mem_percent: float | None = None
    running_jobs: int | None = None  # the node's own count
    last_healthy: bool | None = None  # "1" / "0"; "" before the first heartbeat: None
    last_health_reason: str = ""
    window: str = ""  # last health checks, oldest first: "1" healthy, "0" not
    consecutive_ok: int = 0
    consecutive_fail: int = 0
    # field running_mismatch, "<heartbeats>[:<since ms>]": heartbeats in a row with
    # running_jobs differing from the assigned jobs, and when the episode began (once it has)
    mismatch_heartbeats: int = 0
    mismatch_since_ms: int | None = None
    # -- job outcomes (_nodejob.lua's note_job_outcome)
    job_window: str = ""  # "1" good, "0" the node's own failure, oldest first
    job_last_failure: dict[str, Any] | None = None  # {code, job_id, at_ms}; {} or unreadable: None
    job_cooldown_until_ms: int | None = None
    # -- drain (drain_node, undrain_node, expire_drain)
    drain_requested: bool = False  # drain_requested_ms holds a text: a drain was asked for
    drain_requested_ms: int | None = None
    drain_requested_by: str | None = None
    drain_reason: str | None = None
    drain_deadline_ms: int | None = None  # ("": no deadline)
    drain_jobs_at_start: int | None = None
    drain_ended_ms: int | None = None
    drain_outcome: str | None = None  # drained, cancelled, undrained, ended: ...; "": None
    drain_pending: bool = False  # "1" while the drain is to go on
    # -- cordon (cordon_node; uncordon_node deletes the fields)
    cordoned: bool = False  # "1"
    cordon_reason: str = ""
    cordoned_by: str = ""
    cordoned_ms: int | None = None
    # -- jobs that ended on the node, by final state (count_node_jobs: finished_<state>)
    finished: dict[JobState, int] = field(default_factory=lambda: dict.fromkeys(FINAL_STATES, 0))

    #: Every field of the hash, for HMGET.
    FIELDS = (
        "node_id", "secret_hash", "session_id", "web_id", "connected", "session_started_ms", "registered_at_ms",
        "version", "capability_schema_version", "advanced_features", "hardware", "gpu_count", "gpu_available",
        "models", "labels", "accept_public", "max_concurrent_jobs",
        "status", "previous_status", "status_reason", "offline_cause", "status_since_ms",
        "last_seen_ms", "last_heartbeat_ms", "cpu_percent", "gpu_percent", "mem_percent", "running_jobs",
        "last_healthy", "last_health_reason", "window", "consecutive_ok", "consecutive_fail", "running_mismatch",
        "job_window", "job_last_failure", "job_cooldown_until_ms",
        "drain_requested_ms", "drain_requested_by", "drain_reason", "drain_deadline_ms", "drain_jobs_at_start",
        "drain_ended_ms", "drain_outcome", "drain_pending",
        "cordoned", "cordon_reason", "cordoned_by", "cordoned_ms",
        *(f"finished_{state}" for state in FINAL_STATES),
    )

    @classmethod
    def from_hash(cls, raw: Stored) -> NodeRecord:
        """The record of a stored node hash (or of the fields of it an HMGET read)."""
        get = raw.get
        beats, _, since = (get("running_mismatch") or "").partition(":")
        return cls(
            node_id=get("node_id"),
            secret_hash=get("secret_hash"),
            session_id=get("session_id"),
            web_id=get("web_id"),
            connected=get("connected") == "1",
            session_started_ms=as_int(get("session_started_ms")),
            registered_at_ms=as_int(get("registered_at_ms")),
            version=get("version") or "",
            capability_schema_version=get("capability_schema_version") or "",
            advanced_features=as_json(get("advanced_features"), {}),
            hardware=as_json(get("hardware"), {}),
            gpu_count=as_int(get("gpu_count")) or 0,
            gpu_available=get("gpu_available") == "1",
            models=_dicts(get("models")),
            labels=as_json(get("labels"), {}),
            accept_public=get("accept_public") == "1",
            max_concurrent_jobs=as_int(get("max_concurrent_jobs")),
            status=_enum(NodeStatus, get("status")),
            status_text=get("status"),
            previous_status=_enum(NodeStatus, get("previous_status")),
            previous_status_text=get("previous_status") or None,
            status_reason=get("status_reason") or "",
            offline_cause=_enum(FailureCode, get("offline_cause")),
            status_since_ms=as_int(get("status_since_ms")),
            last_seen_ms=as_int(get("last_seen_ms")),
            last_heartbeat_ms=as_int(get("last_heartbeat_ms")),
            cpu_percent=as_float(get("cpu_percent")),
            gpu_percent=as_float(get("gpu_percent")),
            mem_percent=as_float(get("mem_percent")),
            running_jobs=as_int(get("running_jobs")),
            last_healthy={"1": True, "0": False}.get(get("last_healthy") or ""),
            last_health_reason=get("last_health_reason") or "",
            window=get("window") or "",
            consecutive_ok=as_int(get("consecutive_ok")) or 0,
            consecutive_fail=as_int(get("consecutive_fail")) or 0,
            mismatch_heartbeats=as_int(beats) or 0,
            mismatch_since_ms=as_int(since),
            job_window=get("job_window") or "",
            job_last_failure=as_json(get("job_last_failure"), {}) or None,
            job_cooldown_until_ms=as_int(get("job_cooldown_until_ms")),
            drain_requested=bool(get("drain_requested_ms")),
            drain_requested_ms=as_int(get("drain_requested_ms")),
            drain_requested_by=get("drain_requested_by"),
            drain_reason=get("drain_reason"),
            drain_deadline_ms=as_int(get("drain_deadline_ms")),
            drain_jobs_at_start=as_int(get("drain_jobs_at_start")),
            drain_ended_ms=as_int(get("drain_ended_ms")),
            drain_outcome=get("drain_outcome") or None,
            drain_pending=get("drain_pending") == "1",
            cordoned=get("cordoned") == "1",
            cordon_reason=get("cordon_reason") or "",
            cordoned_by=get("cordoned_by") or "",
            cordoned_ms=as_int(get("cordoned_ms")),
            finished={state: as_int(get(f"finished_{state}")) or 0 for state in FINAL_STATES},
        )


@dataclass(frozen=True)
class JobRecord:
    """A job's hash (lua/submit_job.lua, dispatch_job.lua, ack_job.lua, complete_job.lua,
    note_waiting.lua, and _job.lua's finish and back_to_waiting)."""

    # -- as submitted (submit_job)
    job_id: str | None = None
    job_type: str | None = None
    payload: str | None = None  # the JSON text, verbatim: it goes to the node as it came
    required_models: list[Any] = field(default_factory=list)
    require_gpu: bool = False  # "1"
    public: bool = False  # "1"
    node_selector: dict[str, Any] = field(default_factory=dict)
    timeout_seconds: float | None = None
    timeout_ms: int | None = None
    max_attempts: int | None = None
    dispatch_timeout_ms: int | None = None
    priority: int | None = None
    needs_class: str | None = None  # the kind of needs (JobNeeds.kind)
    needs: dict[str, Any] = field(default_factory=dict)  # JobNeeds.to_json's
    queue_score: int | None = None
    submitted_ms: int | None = None
    worker: str = ""  # the Celery worker that took the submission
    # -- where it stands: the enum, None for a word this version does not know;
    #    ``state_text`` as stored, which views show
    state: JobState | None = None
    state_text: str | None = None
    waiting_since_ms: int | None = None
    avoid: list[Any] = field(default_factory=list)  # nodes it left, to avoid
    last_decision: dict[str, Any] | None = None  # {} or unreadable: None
    # -- the current attempt (node_id "" while it waits: None)
    attempt: int | None = None
    node_id: str | None = None
    assigned_ms: int | None = None
    acked_ms: int | None = None
    progress: float | None = None
    progress_message: str | None = None  # "": None
    # -- attempts that ended, and the end
    attempts: list[dict[str, Any]] = field(default_factory=list)  # its objects only
    last_error: dict[str, Any] | None = None  # the last retried error; {} or unreadable: None
    result_received_ms: int | None = None
    finished_ms: int | None = None
    outcome: dict[str, Any] | None = None  # {} or unreadable: None
    output: str | None = None  # a success's JSON text, verbatim

    #: Every field of the hash, for HMGET.
    FIELDS = (
        "job_id", "job_type", "payload", "required_models", "require_gpu", "public", "node_selector",
        "timeout_seconds", "timeout_ms", "max_attempts", "dispatch_timeout_ms", "priority", "needs_class", "needs",
        "queue_score", "submitted_ms", "worker",
        "state", "waiting_since_ms", "avoid", "last_decision",
        "attempt", "node_id", "assigned_ms", "acked_ms", "progress", "progress_message",
        "attempts", "last_error", "result_received_ms", "finished_ms", "outcome", "output",
    )

    @classmethod
    def from_hash(cls, raw: Stored) -> JobRecord:
        """The record of a stored job hash (or of the fields of it an HMGET read)."""
        get = raw.get
        return cls(
            job_id=get("job_id"),
            job_type=get("job_type"),
            payload=get("payload"),
            required_models=as_json(get("required_models"), []),
            require_gpu=get("require_gpu") == "1",
            public=get("public") == "1",
            node_selector=as_json(get("node_selector"), {}),
            timeout_seconds=as_float(get("timeout_seconds")),
            timeout_ms=as_int(get("timeout_ms")),
            max_attempts=as_int(get("max_attempts")),
            dispatch_timeout_ms=as_int(get("dispatch_timeout_ms")),
            priority=as_int(get("priority")),
            needs_class=get("needs_class"),
            needs=as_json(get("needs"), {}),
            queue_score=as_int(get("queue_score")),
            submitted_ms=as_int(get("submitted_ms")),
            worker=get("worker") or "",
            state=_enum(JobState, get("state")),
            state_text=get("state"),
            waiting_since_ms=as_int(get("waiting_since_ms")),
            avoid=as_json(get("avoid"), []),
            last_decision=as_json(get("last_decision"), {}) or None,
            attempt=as_int(get("attempt")),
            node_id=get("node_id") or None,
            assigned_ms=as_int(get("assigned_ms")),
            acked_ms=as_int(get("acked_ms")),
            progress=as_float(get("progress")),
            progress_message=get("progress_message") or None,
            attempts=_dicts(get("attempts")),
            last_error=as_json(get("last_error"), {}) or None,
            result_received_ms=as_int(get("result_received_ms")),
            finished_ms=as_int(get("finished_ms")),
            outcome=as_json(get("outcome"), {}) or None,
            output=get("output"),
        )
