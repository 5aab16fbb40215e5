"""The script loader: the only caller of Lua.

Each ``lua/<verb_noun>.lua`` is read once from the installed package and
registered once per Redis client (redis-py falls back from EVALSHA to SCRIPT
LOAD by itself after a flush or a restart). A script whose first line is
``--#include node``, ``--#include job`` or both gets a generated header
binding ``K`` (the node bundle), ``J`` (the job bundle), ``NEXT`` and ``P``
(the parameters, passed as one JSON text in ARGV[1]), then the preludes
``lua/_common.lua``, ``_node.lua``, ``_job.lua`` and, with both, ``_nodejob.lua``.

Every script has one typed wrapper below that turns its reply into Python
values or a ``StoreError``. An error Redis reports from a script becomes a
``ScriptError`` naming the script's source file and line (``lua/_job.lua:36``),
not the line of the expanded text Redis ran.
"""

from __future__ import annotations

import enum
import functools
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import redis

from dispatcher.batching import ScriptBatcher
from dispatcher.errors import JobMoved, KindNeeded, NodeIdConflict, ScriptRetry, StoreError
from dispatcher.keys import CELERY_RESULT_EXPIRES_S, JOB_BUNDLE, NODE_BUNDLE, Keys
from dispatcher.metrics import SCRIPT_SECONDS
from dispatcher.records import as_int
from dispatcher.store import store_error, unavailable
from dispatcher.vocabulary import JobState, NodeStatus, inline_lua_constants, lua_lists

_INCLUDE = "--#include "
#: Key bundles a script may include, in the order their keys come in KEYS.
_BUNDLES = {"node": ("K", NODE_BUNDLE), "job": ("J", JOB_BUNDLE)}
#: A line of the text Redis ran, as its errors name it: ``user_script:12: ...`` (a Lua error
#: or a compile error) and, in Redis 7, ``... on @user_script:12.`` after any error in a script.
_SCRIPT_LINE = re.compile(r"@?user_script:(\d+)")

#: Where a line of a script's text comes from: (file in lua/, line number), None for a line
#: the loader generated.
Origin = tuple[str, int] | None


@dataclass(frozen=True)
class Source:
    """A script's text as Redis runs it, and where each of its lines comes from."""

    text: str
    #: Line ``i + 1`` of ``text`` comes from ``origins[i]``.
    origins: tuple[Origin, ...]

    def where(self, line: int) -> str:
        """``lua/<file>.lua:<line>`` for a line of ``text``."""
        origin = self.origins[line - 1] if 0 < line <= len(self.origins) else None
        return f"lua/{origin[0]}:{origin[1]}" if origin else f"the loader's preamble (line {line})"

    def locate(self, message: str) -> str:
        """A Redis error's ``message`` with each line of ``text`` it names told as its source file and line."""
        return _SCRIPT_LINE.sub(lambda m: self.where(int(m.group(1))), message)


def _numbered(text: str, file: str | None, first: int = 1) -> list[tuple[str, Origin]]:
    return [(line, (file, first + i) if file else None) for i, line in enumerate(text.split("\n"))]


def _expanded(file: str, text: str, read: Any) -> Source:
    """The script ``file`` (its ``text``) as Redis runs it: an ``--#include node job`` first line
    replaced by the bundles' bindings, the lists it names and the preludes (``read(name)``
    gives a prelude's text)."""
    text = inline_lua_constants(text)
    if not text.startswith(_INCLUDE):
        return Source(text, tuple(origin for _, origin in _numbered(text, file)))
    first, _, body = text.partition("\n")
    included = first[len(_INCLUDE):].split()
    unknown = set(included) - set(_BUNDLES)
    if unknown:
        raise ValueError(f"unknown include {sorted(unknown)}")
    lines, position = [], 1
    for name in _BUNDLES:  # bundle order is fixed, whatever the include line says
        if name in included:
            table, names = _BUNDLES[name]
            bindings = ", ".join(f"{n} = KEYS[{position + i}]" for i, n in enumerate(names))
            lines.append(f"local {table} = {{{bindings}}}")
            position += len(names)
    lines += [f"local NEXT = {position}", "local P = cjson.decode(ARGV[1])"]
    prelude_files = ["_common.lua", *(f"_{name}.lua" for name in _BUNDLES if name in included)]
    if len(included) > 1:
        prelude_files.append("_" + "".join(n for n in _BUNDLES if n in included) + ".lua")
    preludes = {name: inline_lua_constants(read(name)) for name in prelude_files}
    constants = lua_lists("\n".join([*preludes.values(), body]))
    numbered: list[tuple[str, Origin]] = [(line, None) for line in lines]
    if constants:
        numbered += _numbered(constants, None)
    for name, prelude in preludes.items():
        numbered += _numbered(prelude, name)
    numbered += _numbered(body, file, first=2)
    return Source("\n".join(line for line, _ in numbered), tuple(origin for _, origin in numbered))


def _expand(text: str, read: Any) -> str:
    """Replace an ``--#include node job`` first line with the bundles' bindings and preludes."""
    return _expanded("<script>.lua", text, read).text


def _lua_folder() -> Any:
    """Where the scripts are: the installed package ``dispatcher.lua``, or ``lua/`` beside the
    ``dispatcher`` package when the code runs from a checkout that is not installed (a
    platform's build installs requirements.txt and runs the app from its folder)."""
    try:
        return resources.files("dispatcher.lua")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "lua"


@functools.cache
def script_table() -> dict[str, Source]:
    """Name -> the script as Redis runs it, with the preludes of its includes expanded."""
    package = _lua_folder()

    def read(name: str) -> str:
        return (package / name).read_text()
    return {entry.name.removesuffix(".lua"): _expanded(entry.name, entry.read_text(), read)
            for entry in package.iterdir() if entry.name.endswith(".lua") and not entry.name.startswith("_")}


@functools.cache
def script_sources() -> dict[str, str]:
    """Name -> full Lua source, with the preludes of its includes expanded."""
    return {name: source.text for name, source in script_table().items()}


class ScriptError(StoreError, redis.ResponseError):
    """Raised when Redis answers a script call with an error: the text names the script, and
    the source file and line of the error (``lua/_job.lua:36``) where Redis names a line of the
    expanded text. A ``redis.ResponseError`` too, as the error it replaces was."""

    @classmethod
    def located(cls, name: str, error: redis.ResponseError) -> ScriptError:
        """The error of script ``name`` for Redis's ``error`` (one message argument, so that
        it pickles as any exception does)."""
        source = script_table().get(name)
        text = str(error)
        return cls(f"{name}: {source.locate(text) if source else text}")


# --- what the scripts answer ---------------------------------------------------
# Each wrapper of ``Scripts`` parses its script's reply into one of these (or raises): a
# dataclass when the reply carries data, a member of ``Reply`` when it is a word and
# nothing more. A reply no script gives raises StoreError.


class Reply(enum.StrEnum):
    """A script's reply that is one word and nothing more (each wrapper says which it may give)."""

    #: No such node (or job).
    UNKNOWN = "unknown"
    #: record_heartbeat: another session holds the node.
    SUPERSEDED = "superseded"
    #: record_heartbeat: the node is offline; its session must register again.
    OFFLINE = "offline"
    #: close_session: an unknown node, another session's, or one already offline.
    IGNORED = "ignored"
    #: expire_node: heard from within the timeout after all.
    ALIVE = "alive"
    #: Nothing left to do: expire_node, expire_warmup and expire_drain found the node in
    #: another status; release_job found the job on no node.
    GONE = "gone"
    #: expire_warmup: still within warmup, or healthy so far.
    WAITING = "waiting"
    #: undrain_node: the node was drained offline; its session closes and it registers again.
    RECONNECT = "reconnect"
    #: undrain_node: the node is away mid-drain; it will not drain when it comes back.
    CANCELLED = "cancelled"
    #: forget_node: the node's record and index entries are gone.
    FORGOTTEN = "forgotten"
    #: submit_job: a job waiting ahead could take the node; this one waits behind it.
    QUEUED = "queued"
    #: submit_job: revoked through Celery before it arrived (nothing written).
    REVOKED = "revoked"
    #: The condition no longer holds (release_job), or is not due yet (expire_dispatch).
    KEPT = "kept"


class Mismatch(enum.StrEnum):
    """record_heartbeat: whether the node's running_jobs disagrees with its assigned jobs."""

    #: Nothing to say (they agree, or disagreed for fewer heartbeats than the setting).
    NONE = ""
    #: They have disagreed for the set number of heartbeats (said once per episode).
    BEGAN = "began"
    #: They agree again after an episode.
    ENDED = "ended"


class Kept(enum.StrEnum):
    """forget_node: why the node is kept for now (checked again later)."""

    #: Heard from within the retention.
    SEEN = "seen"
    #: Jobs are still assigned to it.
    JOBS = "jobs"


@dataclass(frozen=True)
class NodeRegistered:
    """register_node: the node is bound to the new session."""

    status: NodeStatus
    resumed: bool
    #: The session that held it before ("" for a new node).
    old_session_id: str = ""


@dataclass(frozen=True)
class HeartbeatOutcome:
    """record_heartbeat: the heartbeat is recorded."""

    status: NodeStatus
    transitioned: bool
    previous_status: NodeStatus
    reason: str
    #: The node may take work it could not before, and jobs are waiting.
    kick: bool
    mismatch: Mismatch = Mismatch.NONE
    #: The jobs assigned to the node, by our record.
    assigned: int = 0


@dataclass(frozen=True)
class WentOffline:
    """close_session, expire_node: the node is offline now."""

    previous: NodeStatus
    reason: str


@dataclass(frozen=True)
class WarmupDegraded:
    """expire_warmup: the node's warmup ran out while unhealthy; it is degraded now."""

    reason: str


@dataclass(frozen=True)
class DrainStarted:
    """drain_node: the node is draining, or already drained offline when nothing was assigned."""

    previous: NodeStatus
    jobs_left: int
    #: Nothing was assigned: the node went on to offline at once.
    drained: bool


@dataclass(frozen=True)
class Refused:
    """drain_node, undrain_node: the node's status does not allow it."""

    status: NodeStatus


@dataclass(frozen=True)
class Undrained:
    """undrain_node: the draining node is back in service."""

    status: NodeStatus


@dataclass(frozen=True)
class DrainExpired:
    """expire_drain: the deadline passed; the node is offline and its jobs go back to dispatch."""

    jobs_handed_back: int


@dataclass(frozen=True)
class NotOffline:
    """forget_node: the node is not offline, so it is not forgotten."""

    status: NodeStatus


@dataclass(frozen=True)
class Cordoned:
    """cordon_node: the node takes no new job."""

    status: NodeStatus
    #: It was cordoned already (the new reason is recorded).
    already: bool


@dataclass(frozen=True)
class Uncordoned:
    """uncordon_node: the node may take new jobs (once ready)."""

    status: NodeStatus
    #: False when there was no cordon to end.
    was_cordoned: bool


@dataclass(frozen=True)
class Assigned:
    """submit_job, dispatch_job: the job went to a node (its job_assign is queued)."""

    node_id: str
    attempt: int
    #: {"counts": {reason: n}, "examples": {reason: [node ids]}} of the nodes passed over.
    exclusions: dict[str, Any]
    #: How long the job had waited (dispatch_job; 0 for a job assigned as it was submitted).
    waited_ms: int = 0


@dataclass(frozen=True)
class Waiting:
    """submit_job, dispatch_job: no candidate fits; the job waits."""

    exclusions: dict[str, Any]


@dataclass(frozen=True)
class Exists:
    """submit_job: a job with this id was submitted before."""

    state: JobState


@dataclass(frozen=True)
class NotWaiting:
    """dispatch_job, note_waiting: the job no longer waits (None: no such job)."""

    state: JobState | None


@dataclass(frozen=True)
class Acked:
    """ack_job: the node holds the current attempt."""

    #: The node's first word on this attempt (else a repeated ack, or progress).
    started: bool
    #: The job's kind of needs (what its completion needs to send it back to wait).
    kind: str
    #: The Celery worker that took the submission ("" when the reply does not say).
    worker: str = ""


@dataclass(frozen=True)
class Stale:
    """ack_job, complete_job: not the current attempt of this node; nothing changed (the
    job's state; None: no such job)."""

    state: JobState | None


@dataclass(frozen=True)
class Completed:
    """complete_job: the node's result ended the job."""

    state: JobState
    #: The job's outcome as recorded (what the task events tell).
    outcome: dict[str, Any]
    assigned_ms: int | None
    #: A waiting job could take the freed slot: a pass over the waiting jobs is due.
    kick: bool
    #: The JobFailures reason when the result degraded the node, else "".
    degraded: str = ""


@dataclass(frozen=True)
class Requeued:
    """complete_job, release_job: the job waits for another node (a pass over the waiting
    jobs is due)."""

    #: The Celery worker that took the submission.
    worker: str
    #: The JobFailures reason when this degraded the node, else "".
    degraded: str = ""


@dataclass(frozen=True)
class OutOfAttempts:
    """release_job: no attempt is left; the job failed."""

    outcome: dict[str, Any]
    degraded: str = ""


@dataclass(frozen=True)
class Cancelled:
    """cancel_job: the job is cancelled (its node, if any, was told to stop)."""

    #: The node it was on ("" when it was waiting).
    node_id: str
    outcome: dict[str, Any]


@dataclass(frozen=True)
class AlreadyFinished:
    """cancel_job: too late, the job is over."""

    state: JobState


@dataclass(frozen=True)
class Noted:
    """note_waiting: why the job waits is written (its Celery WAITING meta)."""

    meta: dict[str, Any]
    #: The Celery worker that took the submission.
    worker: str


@dataclass(frozen=True)
class DispatchExpired:
    """expire_dispatch: the job failed for want of a node."""

    outcome: dict[str, Any]


def _job_state(value: Any) -> JobState | None:
    """A job's state as a script names it; None for ``unknown`` (no such job)."""
    return None if value == Reply.UNKNOWN else JobState(value)


def _object(text: Any) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object: {text!r}")
    return value


def _flag(value: Any) -> bool:
    if value not in ("0", "1"):
        raise ValueError(f"not a flag: {value!r}")
    return value == "1"


@dataclass(frozen=True)
class Search:
    """How a dispatch script looks for a node: the index sets a candidate must be in (the
    job's needs), how many candidates it checks, and the filter's thresholds."""

    sets: list[str]
    wanted: int
    budget: int
    heartbeat_timeout_ms: int
    resource_threshold: float
    examples: int


class Scripts:
    """Typed calls of the Lua scripts on one Redis client.

    Every wrapper parses its script's reply (see the reply types above) and raises
    StoreError for a reply its script never gives; ``ScriptRetry`` (``JobMoved``,
    ``KindNeeded``) when the caller must read again and call again. A redis-py error
    is raised as StoreError (``_call``)."""

    def __init__(self, client: redis.Redis, keys: Keys, batcher: ScriptBatcher | None = None) -> None:
        self._client = client
        self.keys = keys
        #: When given, calls go through it, grouped with other callers' into pipelines.
        self._batcher = batcher
        self._scripts = {name: client.register_script(src) for name, src in script_sources().items()}
        self._channels = {"wake_channel": keys.wake_channel()}
        self._node_key = keys.node_key_parts()

    def _call(self, name: str, keys: list[str], params: dict[str, Any] | None = None,
              args: list[Any] | None = None) -> Any:
        if params is not None:
            args = [json.dumps({**params, **self._channels}, separators=(",", ":"))]
        started_s = time.perf_counter()
        try:
            if self._batcher is not None:
                return self._batcher.call(self._scripts[name], keys, args or [])
            return self._scripts[name](keys=keys, args=args or [], client=self._client)
        except redis.ResponseError as exc:
            if unavailable(exc):  # (a write refused by a replica, say: a failover in progress)
                raise store_error(exc) from exc
            raise ScriptError.located(name, exc) from exc  # a script's error, located in its source file
        except redis.RedisError as exc:  # batched or not: the one translation of a script call's errors
            raise store_error(exc) from exc
        finally:
            SCRIPT_SECONDS.labels(name).observe(time.perf_counter() - started_s)

    @staticmethod
    def _unexpected(name: str, reply: Any) -> StoreError:
        return StoreError(f"{name} returned an unexpected reply: {reply!r}")

    @contextmanager
    def _parsing(self, name: str, reply: Any) -> Iterator[None]:
        """A value in the reply that does not parse (a status no enum has, JSON that is not)
        makes the reply unexpected."""
        try:
            yield
        except (ValueError, TypeError) as exc:
            raise self._unexpected(name, reply) from exc

    # --- nodes -------------------------------------------------------------

    def register_node(self, node_id: str, extra_keys: list[str], params: dict[str, Any]) -> NodeRegistered:
        """Create or resume a node. Raises NodeIdConflict when the node exists and the
        secret does not match, ScriptRetry when the stored node changed since the caller
        read it."""
        reply = self._call("register_node", self.keys.node_bundle(node_id) + extra_keys,
                           {"node_id": node_id, **params})
        with self._parsing("register_node", reply):
            match reply:
                case ["created", status]:
                    return NodeRegistered(NodeStatus(status), resumed=False)
                case ["resumed", status, old_session_id]:
                    return NodeRegistered(NodeStatus(status), resumed=True, old_session_id=str(old_session_id))
                case ["conflict"]:
                    raise NodeIdConflict()
                case ["retry"]:
                    raise ScriptRetry("register_node")
        raise self._unexpected("register_node", reply)

    def record_heartbeat(self, node_id: str, model_keys: list[str], params: dict[str, Any]
                         ) -> HeartbeatOutcome | Literal[Reply.UNKNOWN, Reply.SUPERSEDED, Reply.OFFLINE]:
        """Record a heartbeat. Returns its outcome, or why it was refused. Raises ScriptRetry,
        carrying the stored model list, when ``model_keys`` missed one of the node's models."""
        reply = self._call("record_heartbeat", self.keys.node_bundle(node_id) + model_keys,
                           {"node_id": node_id, **params})
        with self._parsing("record_heartbeat", reply):
            match reply:
                case ["ok", status, transitioned, previous, reason, kick, *more] if len(more) in (0, 2):
                    mismatch, assigned = more or ("", 0)
                    return HeartbeatOutcome(NodeStatus(status), _flag(transitioned), NodeStatus(previous),
                                            str(reason), _flag(kick), Mismatch(mismatch), int(assigned))
                case [Reply.UNKNOWN]:
                    return Reply.UNKNOWN
                case [Reply.SUPERSEDED]:
                    return Reply.SUPERSEDED
                case [Reply.OFFLINE]:
                    return Reply.OFFLINE
                case ["retry", stored]:
                    raise ScriptRetry("record_heartbeat", stored=stored)
        raise self._unexpected("record_heartbeat", reply)

    def close_session(self, node_id: str, session_id: str, reason: str, now_ms: int,
                      reassign_grace_ms: int) -> WentOffline | Literal[Reply.IGNORED]:
        """Take the node offline if this session still holds it."""
        reply = self._call("close_session", self.keys.node_bundle(node_id), {
            "node_id": node_id, "session_id": session_id, "reason": reason, "now_ms": now_ms,
            "reassign_grace_ms": reassign_grace_ms})
        with self._parsing("close_session", reply):
            match reply:
                case [NodeStatus.OFFLINE, previous]:
                    return WentOffline(NodeStatus(previous), reason)
                case [Reply.IGNORED]:
                    return Reply.IGNORED
        raise self._unexpected("close_session", reply)

    def expire_node(self, node_id: str, now_ms: int, timeout_ms: int,
                    reassign_grace_ms: int) -> WentOffline | Literal[Reply.ALIVE, Reply.GONE]:
        """Take a silent node offline."""
        reply = self._call("expire_node", self.keys.node_bundle(node_id), {
            "node_id": node_id, "now_ms": now_ms, "timeout_ms": timeout_ms,
            "reassign_grace_ms": reassign_grace_ms})
        with self._parsing("expire_node", reply):
            match reply:
                case [NodeStatus.OFFLINE, previous, reason]:
                    return WentOffline(NodeStatus(previous), str(reason))
                case [Reply.ALIVE]:
                    return Reply.ALIVE
                case [Reply.GONE]:
                    return Reply.GONE
        raise self._unexpected("expire_node", reply)

    def expire_warmup(self, node_id: str, now_ms: int,
                      warmup_ms: int) -> WarmupDegraded | Literal[Reply.WAITING, Reply.GONE]:
        """Degrade a node whose warmup ran out while unhealthy."""
        reply = self._call("expire_warmup", self.keys.node_bundle(node_id), {
            "node_id": node_id, "now_ms": now_ms, "warmup_ms": warmup_ms})
        with self._parsing("expire_warmup", reply):
            match reply:
                case [NodeStatus.DEGRADED, reason]:
                    return WarmupDegraded(str(reason))
                case [Reply.WAITING]:
                    return Reply.WAITING
                case [Reply.GONE]:
                    return Reply.GONE
        raise self._unexpected("expire_warmup", reply)

    def drain_node(self, node_id: str, now_ms: int, requested_by: str, reason: str,
                   deadline_ms: int | None) -> DrainStarted | Refused | Literal[Reply.UNKNOWN]:
        """Start a drain (only a ready or degraded node can be drained)."""
        reply = self._call("drain_node", self.keys.node_bundle(node_id), {
            "node_id": node_id, "now_ms": now_ms, "requested_by": requested_by, "reason": reason,
            "deadline_ms": deadline_ms})
        with self._parsing("drain_node", reply):
            match reply:
                case [NodeStatus.DRAINING, jobs_left, previous]:
                    return DrainStarted(NodeStatus(previous), int(jobs_left), drained=False)
                case ["drained", 0, previous]:
                    return DrainStarted(NodeStatus(previous), 0, drained=True)
                case ["refused", status]:
                    return Refused(NodeStatus(status))
                case [Reply.UNKNOWN]:
                    return Reply.UNKNOWN
        raise self._unexpected("drain_node", reply)

    def undrain_node(self, node_id: str, now_ms: int, requested_by: str
                     ) -> Undrained | Refused | Literal[Reply.RECONNECT, Reply.CANCELLED, Reply.UNKNOWN]:
        """End a drain: a draining node is back in service; one drained offline must
        reconnect; one away mid-drain will not drain when it comes back."""
        reply = self._call("undrain_node", self.keys.node_bundle(node_id), {
            "node_id": node_id, "now_ms": now_ms, "requested_by": requested_by})
        with self._parsing("undrain_node", reply):
            match reply:
                case ["resumed", status]:
                    return Undrained(NodeStatus(status))
                case ["refused", status]:
                    return Refused(NodeStatus(status))
                case [Reply.RECONNECT]:
                    return Reply.RECONNECT
                case [Reply.CANCELLED]:
                    return Reply.CANCELLED
                case [Reply.UNKNOWN]:
                    return Reply.UNKNOWN
        raise self._unexpected("undrain_node", reply)

    def expire_drain(self, node_id: str, now_ms: int) -> DrainExpired | Literal[Reply.GONE]:
        """Finish a drain whose deadline passed (GONE: not draining, or not yet due)."""
        reply = self._call("expire_drain", self.keys.node_bundle(node_id), {
            "node_id": node_id, "now_ms": now_ms})
        with self._parsing("expire_drain", reply):
            match reply:
                case ["drained", jobs]:
                    return DrainExpired(int(jobs))
                case [Reply.GONE]:
                    return Reply.GONE
        raise self._unexpected("expire_drain", reply)

    def forget_node(self, node_id: str, extra_keys: list[str], params: dict[str, Any]
                    ) -> Kept | NotOffline | Literal[Reply.FORGOTTEN, Reply.UNKNOWN]:
        """Delete a long-gone node: offline, unseen for the retention, holding no job. Raises
        ScriptRetry when its models or labels changed since the caller read them."""
        reply = self._call("forget_node", self.keys.node_bundle(node_id) + extra_keys + [self.keys.cordoned()],
                           {"node_id": node_id, **params})
        with self._parsing("forget_node", reply):
            match reply:
                case [Reply.FORGOTTEN]:
                    return Reply.FORGOTTEN
                case [Reply.KEPT, why]:
                    return Kept(why)
                case [Reply.GONE, "unknown"]:
                    return Reply.UNKNOWN
                case [Reply.GONE, status]:
                    return NotOffline(NodeStatus(status))
                case ["retry"]:
                    raise ScriptRetry("forget_node")
        raise self._unexpected("forget_node", reply)

    def cordon_node(self, node_id: str, now_ms: int, requested_by: str,
                    reason: str) -> Cordoned | Literal[Reply.UNKNOWN]:
        """Keep a node from new jobs."""
        reply = self._call("cordon_node", [*self.keys.node_bundle(node_id), self.keys.cordoned()], {
            "node_id": node_id, "now_ms": now_ms, "requested_by": requested_by, "reason": reason})
        with self._parsing("cordon_node", reply):
            match reply:
                case ["cordoned", status, already]:
                    return Cordoned(NodeStatus(status), _flag(already))
                case [Reply.UNKNOWN]:
                    return Reply.UNKNOWN
        raise self._unexpected("cordon_node", reply)

    def uncordon_node(self, node_id: str, now_ms: int) -> Uncordoned | Literal[Reply.UNKNOWN]:
        """End a cordon (there may be none)."""
        reply = self._call("uncordon_node", [*self.keys.node_bundle(node_id), self.keys.cordoned()],
                           {"node_id": node_id, "now_ms": now_ms})
        with self._parsing("uncordon_node", reply):
            match reply:
                case [("uncordoned" | "not_cordoned") as word, status]:
                    return Uncordoned(NodeStatus(status), was_cordoned=word == "uncordoned")
                case [Reply.UNKNOWN]:
                    return Reply.UNKNOWN
        raise self._unexpected("uncordon_node", reply)

    def pop_frames(self, node_id: str, session_id: str, max_frames: int,
                   max_bytes: int) -> list[str] | Literal[Reply.SUPERSEDED]:
        """Frames queued for the node (at most ``max_frames``, and ``max_bytes`` but for
        the first), or SUPERSEDED when another session holds it."""
        reply = self._call("pop_frames", [self.keys.node(node_id), self.keys.queue(node_id)],
                           args=[session_id, max_frames, max_bytes])
        if reply is None:
            return Reply.SUPERSEDED
        if isinstance(reply, list) and all(isinstance(frame, str) for frame in reply):
            return reply
        raise self._unexpected("pop_frames", reply)

    def count_node_jobs(self, counts: dict[str, dict[str, int]]) -> int:
        """Add jobs finished to their nodes' records (node id -> {field: n}); a node that no
        longer exists is skipped. Returns how many nodes were counted."""
        node_ids = list(counts)
        reply = self._call("count_node_jobs", [self.keys.node(node_id) for node_id in node_ids],
                           args=[json.dumps(counts[node_id]) for node_id in node_ids])
        if isinstance(reply, int):
            return reply
        raise self._unexpected("count_node_jobs", reply)

    # --- jobs --------------------------------------------------------------

    def _job_call(self, name: str, job_id: str, needs_class: str | None, params: dict[str, Any],
                  node_id: str | None = None, extra_keys: list[str] | None = None) -> Any:
        keys = self.keys.job_bundle(job_id, needs_class)
        if node_id is not None:
            keys = self.keys.node_bundle(node_id) + keys
        # For Celery's result, written with the job's state: its expiry and when it ended.
        done_at = datetime.fromtimestamp(params["now_ms"] / 1000, UTC).isoformat()
        return self._call(name, keys + (extra_keys or []), {
            "job_id": job_id, "needs_class": needs_class, "done_at": done_at,
            "result_expires_s": CELERY_RESULT_EXPIRES_S, **params})

    def submit_job(self, job_id: str, needs_class: str, now_ms: int, queue_score: int, fields: dict[str, Any],
                   search: Search) -> Assigned | Waiting | Exists | Literal[Reply.QUEUED, Reply.REVOKED]:
        """Record a job and give it to a candidate, or make it wait (QUEUED: behind a job
        waiting ahead of it that could take the node)."""
        reply = self._job_call("submit_job", job_id, needs_class, {
            "now_ms": now_ms, "queue_score": queue_score, "fields": fields, **self._search(search)},
            extra_keys=search.sets)
        with self._parsing("submit_job", reply):
            match reply:
                case [JobState.ASSIGNED, node_id, attempt, exclusions]:
                    return Assigned(str(node_id), int(attempt), _object(exclusions))
                case [JobState.WAITING, exclusions]:
                    return Waiting(_object(exclusions))
                case [Reply.QUEUED]:
                    return Reply.QUEUED
                case [Reply.REVOKED]:
                    return Reply.REVOKED
                case ["exists", state]:
                    return Exists(JobState(state))
        raise self._unexpected("submit_job", reply)

    def dispatch_job(self, job_id: str, needs_class: str, now_ms: int,
                     search: Search) -> Assigned | Waiting | NotWaiting:
        """Give a waiting job to a candidate."""
        reply = self._job_call("dispatch_job", job_id, needs_class, {"now_ms": now_ms, **self._search(search)},
                               extra_keys=search.sets)
        with self._parsing("dispatch_job", reply):
            match reply:
                case [JobState.ASSIGNED, node_id, attempt, exclusions, waited_ms]:
                    return Assigned(str(node_id), int(attempt), _object(exclusions), int(waited_ms))
                case [JobState.WAITING, exclusions]:
                    return Waiting(_object(exclusions))
                case ["not_waiting", state]:
                    return NotWaiting(_job_state(state))
        raise self._unexpected("dispatch_job", reply)

    def _search(self, search: Search) -> dict[str, Any]:
        return {"wanted": search.wanted, "budget": search.budget, "node_key": self._node_key,
                "heartbeat_timeout_ms": search.heartbeat_timeout_ms,
                "resource_threshold": search.resource_threshold, "examples": search.examples}

    def ack_job(self, job_id: str, attempt: int, node_id: str, now_ms: int, progress: float | None = None,
                message: str | None = None) -> Acked | Stale:
        """The node started the job, or reports progress."""
        reply = self._job_call("ack_job", job_id, None, {"attempt": attempt, "node_id": node_id, "now_ms": now_ms,
                                                         "progress": progress, "message": message})
        with self._parsing("ack_job", reply):
            match reply:
                case ["started", kind, worker]:
                    return Acked(True, str(kind), str(worker))
                case [JobState.RUNNING, kind, *worker] if len(worker) <= 1:
                    return Acked(False, str(kind), str(worker[0]) if worker else "")
                case ["stale", state]:
                    return Stale(_job_state(state))
        raise self._unexpected("ack_job", reply)

    def complete_job(self, job_id: str, needs_class: str | None, node_id: str, attempt: int, now_ms: int,
                     meta: str, output: str, retention_ms: int,
                     job_health: dict[str, int] | None = None) -> Completed | Requeued | Stale:
        """Apply a node's result; an error with ``node_fault`` counts against the node by the rules
        ``job_health`` (dispatcher.health.job_failure_rules; None: not counted). Raises KindNeeded
        when it would send the job back to wait and ``needs_class`` is None (nothing written)."""
        reply = self._job_call("complete_job", job_id, needs_class, {
            "node_id": node_id, "attempt": attempt, "now_ms": now_ms, "meta": meta, "output": output,
            "retention_ms": retention_ms, "job_health": job_health}, node_id=node_id)
        with self._parsing("complete_job", reply):
            match reply:
                case [(JobState.SUCCEEDED | JobState.FAILED) as state, kick, outcome, assigned_ms, degraded]:
                    return Completed(JobState(state), _object(outcome), as_int(assigned_ms), _flag(kick),
                                     str(degraded))
                case ["retry", "1", worker, degraded]:
                    return Requeued(str(worker), str(degraded))
                case ["stale", state]:
                    return Stale(_job_state(state))
                case ["need_kind"]:
                    raise KindNeeded("complete_job")
        raise self._unexpected("complete_job", reply)

    def release_job(self, job_id: str, needs_class: str, node_id: str, now_ms: int, code: str, message: str, *,
                    cancel_on_node: bool, only_if_offline: bool = False, only_if_due: bool = False,
                    retention_ms: int, job_health: dict[str, int] | None = None
                    ) -> Requeued | OutOfAttempts | Literal[Reply.KEPT, Reply.GONE]:
        """End an attempt without a result; with ``job_health`` (a timeout) it counts against the
        node as complete_job's node faults do. KEPT: the condition (``only_if_*``) no longer
        holds; GONE: the job is on no node. Raises JobMoved when the job is on another node
        than ``node_id``."""
        reply = self._job_call("release_job", job_id, needs_class, {
            "node_id": node_id, "now_ms": now_ms, "code": code, "message": message,
            "cancel_on_node": cancel_on_node, "only_if_offline": only_if_offline, "only_if_due": only_if_due,
            "retention_ms": retention_ms, "job_health": job_health}, node_id=node_id)
        with self._parsing("release_job", reply):
            match reply:
                case ["retry", worker, degraded]:
                    return Requeued(str(worker), str(degraded))
                case [JobState.FAILED, outcome, degraded]:
                    return OutOfAttempts(_object(outcome), str(degraded))
                case [Reply.KEPT]:
                    return Reply.KEPT
                case [Reply.GONE]:
                    return Reply.GONE
                case ["moved"]:
                    raise JobMoved("release_job")
        raise self._unexpected("release_job", reply)

    def cancel_job(self, job_id: str, needs_class: str, node_id: str, now_ms: int, reason: str,
                   retention_ms: int) -> Cancelled | AlreadyFinished | Literal[Reply.UNKNOWN]:
        """Cancel a waiting or running job. Raises JobMoved when the job is on another node
        than ``node_id``."""
        reply = self._job_call("cancel_job", job_id, needs_class, {
            "node_id": node_id, "now_ms": now_ms, "reason": reason, "retention_ms": retention_ms},
            node_id=node_id)
        with self._parsing("cancel_job", reply):
            match reply:
                case [JobState.CANCELLED, on_node, outcome]:
                    return Cancelled(str(on_node), _object(outcome))
                case ["finished", state]:
                    return AlreadyFinished(JobState(state))
                case [Reply.UNKNOWN]:
                    return Reply.UNKNOWN
                case ["moved"]:
                    raise JobMoved("cancel_job")
        raise self._unexpected("cancel_job", reply)

    def note_waiting(self, job_id: str, nodes_key: str, steps: list[tuple[str, list[str], bool]], now_ms: int,
                     examples: int, budget: int) -> Noted | NotWaiting:
        """Write why a waiting job waits (its Celery WAITING state and last decision) from the
        filter's ``steps`` (reason, its index keys, whether its one key lists the nodes failing
        it)."""
        keys = [nodes_key] + [key for _, step_keys, _ in steps for key in step_keys]
        reply = self._job_call("note_waiting", job_id, None, {
            "now_ms": now_ms,
            "steps": [[reason, len(step_keys), excluding] for reason, step_keys, excluding in steps],
            "examples": examples, "budget": budget}, extra_keys=keys)
        with self._parsing("note_waiting", reply):
            match reply:
                case ["noted", meta, worker]:
                    return Noted(_object(meta), str(worker))
                case ["not_waiting", state]:
                    return NotWaiting(_job_state(state))
        raise self._unexpected("note_waiting", reply)

    def expire_dispatch(self, job_id: str, needs_class: str, now_ms: int, message: str, exclusions: dict[str, Any],
                        retention_ms: int, at_once: bool = False) -> DispatchExpired | Literal[Reply.KEPT]:
        """Fail a job still waiting at its dispatch deadline (``at_once``: before it). KEPT:
        not waiting, or not yet due."""
        reply = self._job_call("expire_dispatch", job_id, needs_class, {
            "now_ms": now_ms, "message": message, "exclusions": exclusions, "retention_ms": retention_ms,
            "at_once": at_once})
        with self._parsing("expire_dispatch", reply):
            match reply:
                case [JobState.FAILED, outcome]:
                    return DispatchExpired(_object(outcome))
                case [Reply.KEPT]:
                    return Reply.KEPT
        raise self._unexpected("expire_dispatch", reply)
