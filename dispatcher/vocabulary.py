"""The dispatcher's words, each defined once: node statuses, model states, job states, Celery
states, exclusion reasons, dispatch decision outcomes, failure codes, wire error codes and
WebSocket close codes.

Python uses these enums; the Lua scripts name the same members (``NodeStatus.READY``) and the
loader, ``dispatcher.scripts``, writes their values in (``inline_lua_constants``), so the two
cannot drift. Code
decides on these values, never on human text.

Shared by the server and the node agent: this module imports nothing of the dispatcher.
"""

from __future__ import annotations

import enum
import re


class NodeStatus(enum.StrEnum):
    """A node's status (contract section 3), in the order views list them."""

    REGISTERING = "registering"
    READY = "ready"
    DEGRADED = "degraded"
    DRAINING = "draining"
    OFFLINE = "offline"


class ModelState(enum.StrEnum):
    """A model's status as a node reports it."""

    READY = "ready"
    LOADING = "loading"
    DOWNLOADING = "downloading"
    ERROR = "error"


class JobState(enum.StrEnum):
    """A job's state in its record (the Celery state a client sees is ``CELERY_STATE``'s)."""

    WAITING = "waiting"
    ASSIGNED = "assigned"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


#: States a job never leaves; each has a sorted set of finished jobs (``Keys.finished``).
FINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class CeleryState(enum.StrEnum):
    """The Celery states the scripts write. ``WAITING`` is the dispatcher's own: the job is
    recorded and waits for a node (``celery.states`` has no word for it)."""

    WAITING = "WAITING"
    STARTED = "STARTED"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"


class Exclusion(enum.StrEnum):
    """Why the dispatch filter left a node out (contract section 4), in the order of its steps."""

    STATUS_NOT_READY = "StatusNotReady"
    NOT_IN_PUBLIC_POOL = "NotInPublicPool"
    NODE_SELECTOR_MISMATCH = "NodeSelectorMismatch"
    GPU_UNAVAILABLE = "GpuUnavailable"
    MODEL_NOT_AVAILABLE = "ModelNotAvailable"
    NODE_CORDONED = "NodeCordoned"
    CAPACITY_EXCEEDED = "CapacityExceeded"
    RESOURCE_THRESHOLD_EXCEEDED = "ResourceThresholdExceeded"


class DecisionOutcome(enum.StrEnum):
    """What one dispatch decision came to (the ``outcome`` of its log line and metric)."""

    ASSIGNED = "assigned"
    WAITING = "waiting"
    #: The job no longer waits (placed or ended meanwhile): nothing to record.
    NOT_WAITING = "not_waiting"
    #: No node could take it in time (or ever: fail_fast).
    FAILED = "failed"


class FailureCode(enum.StrEnum):
    """Why the dispatcher ended an attempt or a job without the node's result."""

    TIMEOUT = "TIMEOUT"
    NODE_LOST = "NODE_LOST"
    DRAIN_DEADLINE = "DRAIN_DEADLINE"
    NO_ELIGIBLE_NODE = "NO_ELIGIBLE_NODE"


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` frame (contract section 1)."""

    NODE_ID_CONFLICT = "NODE_ID_CONFLICT"
    UNAUTHORIZED = "UNAUTHORIZED"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    NOT_REGISTERED = "NOT_REGISTERED"
    NODE_ID_MISMATCH = "NODE_ID_MISMATCH"
    RATE_LIMITED = "RATE_LIMITED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server sends (RFC 6455, and the contract's own 4xxx)."""

    NORMAL = 1000
    POLICY = 1008  # unauthorized, registration timeout, a flood, too many waiting sessions
    TOO_LARGE = 1009
    INTERNAL = 1011  # a result could not be recorded: reconnect and resume
    RESTARTING = 1012
    SUPERSEDED = 4001  # a newer session of the same node took over
    NODE_OFFLINE = 4002  # the node was taken offline (drained, expired): register again


#: Every enum the Lua preamble carries, by the name Lua knows it under.
LUA_ENUMS: dict[str, type[enum.Enum]] = {
    "NodeStatus": NodeStatus, "ModelState": ModelState, "JobState": JobState, "CeleryState": CeleryState,
    "Exclusion": Exclusion, "FailureCode": FailureCode, "CloseCode": CloseCode,
}


_LUA_CONSTANT = re.compile(r"\b(" + "|".join(LUA_ENUMS) + r")\.([A-Za-z_][A-Za-z0-9_]*)")


def inline_lua_constants(text: str) -> str:
    """Lua ``text`` with each ``NodeStatus.READY`` (any of ``LUA_ENUMS``) replaced by its value,
    ``'ready'``: the scripts name the words, the loader writes them in, so Lua and Python
    cannot drift and no call pays for tables of constants. An unknown name is an error at
    load time (in Lua it would be nil at run time). Lines stay where they are."""
    def value(match: re.Match[str]) -> str:
        members = LUA_ENUMS[match.group(1)]
        try:
            member = members[match.group(2)]
        except KeyError:
            raise ValueError(f"{match.group(0)}: {match.group(1)} has no member {match.group(2)}") from None
        return str(member.value) if isinstance(member.value, int) else repr(member.value)
    return _LUA_CONSTANT.sub(value, text)


def lua_lists(used_in: str) -> str:
    """Lua text defining the ordered lists ``used_in`` names: ``NODE_STATUSES``, the statuses in
    the order the views list them."""
    if "NODE_STATUSES" not in used_in:
        return ""
    return "local NODE_STATUSES = {" + ", ".join(repr(s.value) for s in NodeStatus) + "}"
