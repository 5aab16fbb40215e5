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

import functools
import json
import re
import time
from datetime import UTC, datetime
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import redis

from dispatcher.batching import ScriptBatcher
from dispatcher.errors import ScriptRetry, StoreError
from dispatcher.keys import CELERY_RESULT_EXPIRES_S, JOB_BUNDLE, NODE_BUNDLE, Keys
from dispatcher.metrics import SCRIPT_SECONDS
from dispatcher.vocabulary import lua_constants

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
    replaced by the bundles' bindings, the constants it names and the preludes (``read(name)``
    gives a prelude's text)."""
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
    preludes = {name: read(name) for name in prelude_files}
    constants = lua_constants("\n".join([*preludes.values(), body]))
    numbered = [(line, None) for line in lines]
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


@dataclass(frozen=True)
class HeartbeatOutcome:
    status: str
    transitioned: bool
    previous_status: str
    reason: str
    #: The node may take work it could not before, and jobs are waiting.
    kick: bool
    #: "began": the node's running_jobs has disagreed with its assigned jobs for the set number
    #: of heartbeats (said once per episode); "ended": they agree again; "" otherwise.
    mismatch: str = ""
    #: The jobs assigned to the node, by our record.
    assigned: int = 0


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
    """Typed calls of the Lua scripts on one Redis client."""

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
            raise ScriptError.located(name, exc) from exc
        finally:
            SCRIPT_SECONDS.labels(name).observe(time.perf_counter() - started_s)

    @staticmethod
    def _unexpected(name: str, reply: Any) -> StoreError:
        return StoreError(f"{name} returned an unexpected reply: {reply!r}")

    # --- nodes -------------------------------------------------------------

    def register_node(self, node_id: str, extra_keys: list[str], params: dict[str, Any]) -> tuple[str, str]:
        """Create or resume a node. Returns (outcome, old session id), outcome
        ``created``, ``resumed`` or ``conflict``; raises ScriptRetry when the
        stored node changed since the caller read it."""
        reply = self._call("register_node", self.keys.node_bundle(node_id) + extra_keys,
                           {"node_id": node_id, **params})
        if reply[0] == "retry":
            raise ScriptRetry("register_node")
        if reply[0] in ("created", "resumed", "conflict"):
            return reply[0], (reply[2] if len(reply) > 2 else "")
        raise self._unexpected("register_node", reply)

    def record_heartbeat(self, node_id: str, model_keys: list[str],
                         params: dict[str, Any]) -> HeartbeatOutcome | str:
        """Record a heartbeat. Returns the outcome, or one of ``unknown``,
        ``superseded``, ``offline``. Raises ScriptRetry, carrying the stored
        model list, when ``model_keys`` missed one of the node's models."""
        reply = self._call("record_heartbeat", self.keys.node_bundle(node_id) + model_keys,
                           {"node_id": node_id, **params})
        if reply[0] == "ok":
            mismatch, assigned = (reply[6], int(reply[7])) if len(reply) > 7 else ("", 0)
            return HeartbeatOutcome(reply[1], reply[2] == "1", reply[3], reply[4], reply[5] == "1", mismatch,
                                    assigned)
        if reply[0] in ("unknown", "superseded", "offline"):
            return reply[0]
        if reply[0] == "retry":
            raise ScriptRetry("record_heartbeat", stored=reply[1])
        raise self._unexpected("record_heartbeat", reply)

    def close_session(self, node_id: str, session_id: str, reason: str, now_ms: int,
                      reassign_grace_ms: int) -> str | None:
        """Take the node offline if this session still holds it. Returns its previous status."""
        reply = self._call("close_session", self.keys.node_bundle(node_id), {
            "node_id": node_id, "session_id": session_id, "reason": reason, "now_ms": now_ms,
            "reassign_grace_ms": reassign_grace_ms})
        return reply[1] if reply[0] == "offline" else None

    def expire_node(self, node_id: str, now_ms: int, timeout_ms: int,
                    reassign_grace_ms: int) -> tuple[str, str] | None:
        """Take a silent node offline. Returns (previous status, reason) when it did."""
        reply = self._call("expire_node", self.keys.node_bundle(node_id), {
            "node_id": node_id, "now_ms": now_ms, "timeout_ms": timeout_ms,
            "reassign_grace_ms": reassign_grace_ms})
        return (reply[1], reply[2]) if reply[0] == "offline" else None

    def expire_warmup(self, node_id: str, now_ms: int, warmup_ms: int) -> str | None:
        """Degrade a node whose warmup ran out while unhealthy. Returns the reason when it did."""
        reply = self._call("expire_warmup", self.keys.node_bundle(node_id), {
            "node_id": node_id, "now_ms": now_ms, "warmup_ms": warmup_ms})
        return reply[1] if reply[0] == "degraded" else None

    def drain_node(self, node_id: str, now_ms: int, requested_by: str, reason: str,
                   deadline_ms: int | None) -> tuple[str, str, str]:
        """Start a drain. Returns (outcome, detail, previous status): ("draining", jobs left, ...),
        ("drained", "0", ...), ("refused", current status, "") or ("unknown", "", "")."""
        reply = self._call("drain_node", self.keys.node_bundle(node_id), {
            "node_id": node_id, "now_ms": now_ms, "requested_by": requested_by, "reason": reason,
            "deadline_ms": deadline_ms})
        padded = [str(x) for x in reply] + ["", ""]
        return padded[0], padded[1], padded[2]

    def undrain_node(self, node_id: str, now_ms: int, requested_by: str) -> tuple[str, str]:
        """End a drain. Returns ("resumed", new status), ("reconnect", ""), ("cancelled", "")
        for a node away mid-drain, ("refused", current status) or ("unknown", "")."""
        reply = self._call("undrain_node", self.keys.node_bundle(node_id), {
            "node_id": node_id, "now_ms": now_ms, "requested_by": requested_by})
        return reply[0], (str(reply[1]) if len(reply) > 1 else "")

    def expire_drain(self, node_id: str, now_ms: int) -> int | None:
        """Finish a drain whose deadline passed. Returns the jobs handed back, or None."""
        reply = self._call("expire_drain", self.keys.node_bundle(node_id), {
            "node_id": node_id, "now_ms": now_ms})
        return int(reply[1]) if reply[0] == "drained" else None

    def forget_node(self, node_id: str, extra_keys: list[str], params: dict[str, Any]) -> tuple[str, str]:
        """Delete a long-gone node. Returns ("forgotten", ""), ("kept", "seen" | "jobs") or
        ("gone", its status); raises ScriptRetry when its models or labels changed since the
        caller read them."""
        reply = self._call("forget_node", self.keys.node_bundle(node_id) + extra_keys + [self.keys.cordoned()],
                           {"node_id": node_id, **params})
        if reply[0] == "retry":
            raise ScriptRetry("forget_node")
        if reply[0] in ("forgotten", "kept", "gone"):
            return str(reply[0]), (str(reply[1]) if len(reply) > 1 else "")
        raise self._unexpected("forget_node", reply)

    def cordon_node(self, node_id: str, now_ms: int, requested_by: str, reason: str) -> tuple[str, str, bool]:
        """Keep a node from new jobs. Returns ("cordoned", its status, whether it already was)
        or ("unknown", "", False)."""
        reply = self._call("cordon_node", self.keys.node_bundle(node_id) + [self.keys.cordoned()], {
            "node_id": node_id, "now_ms": now_ms, "requested_by": requested_by, "reason": reason})
        return str(reply[0]), (str(reply[1]) if len(reply) > 1 else ""), len(reply) > 2 and reply[2] == "1"

    def uncordon_node(self, node_id: str, now_ms: int) -> tuple[str, str]:
        """End a cordon. Returns ("uncordoned" | "not_cordoned", its status) or ("unknown", "")."""
        reply = self._call("uncordon_node", self.keys.node_bundle(node_id) + [self.keys.cordoned()],
                           {"node_id": node_id, "now_ms": now_ms})
        return str(reply[0]), (str(reply[1]) if len(reply) > 1 else "")

    def pop_frames(self, node_id: str, session_id: str, max_frames: int, max_bytes: int) -> list[str] | None:
        """Frames queued for the node (at most ``max_frames``, and ``max_bytes`` but for
        the first), or None when another session holds it."""
        reply = self._call("pop_frames", [self.keys.node(node_id), self.keys.queue(node_id)],
                           args=[session_id, max_frames, max_bytes])
        return None if reply is None else list(reply)

    def count_node_jobs(self, counts: dict[str, dict[str, int]]) -> int:
        """Add jobs finished to their nodes' records (node id -> {field: n}); a node that no
        longer exists is skipped. Returns how many nodes were counted."""
        node_ids = list(counts)
        return int(self._call("count_node_jobs", [self.keys.node(node_id) for node_id in node_ids],
                              args=[json.dumps(counts[node_id]) for node_id in node_ids]))

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
                   search: Search) -> list[Any]:
        """Record a job and give it to a candidate, or make it wait. Returns the reply:
        ["assigned", node, attempt, exclusions] | ["waiting", exclusions] | ["queued"] | ["exists", state]."""
        return list(self._job_call("submit_job", job_id, needs_class, {
            "now_ms": now_ms, "queue_score": queue_score, "fields": fields, **self._search(search)},
            extra_keys=search.sets))

    def dispatch_job(self, job_id: str, needs_class: str, now_ms: int, search: Search) -> list[Any]:
        """Give a waiting job to a candidate. Returns the reply:
        ["assigned", node, attempt, exclusions, waited ms] | ["waiting", exclusions] | ["not_waiting", state]."""
        return list(self._job_call("dispatch_job", job_id, needs_class, {"now_ms": now_ms, **self._search(search)},
                                   extra_keys=search.sets))

    def _search(self, search: Search) -> dict[str, Any]:
        return {"wanted": search.wanted, "budget": search.budget, "node_key": self._node_key,
                "heartbeat_timeout_ms": search.heartbeat_timeout_ms,
                "resource_threshold": search.resource_threshold, "examples": search.examples}

    def ack_job(self, job_id: str, attempt: int, node_id: str, now_ms: int, progress: float | None = None,
                message: str | None = None) -> tuple[str, str, str]:
        """Returns ("started" | "running", the job's kind of needs, the Celery worker that took
        the submission) or ("stale", its state, "")."""
        reply = self._job_call("ack_job", job_id, None, {"attempt": attempt, "node_id": node_id, "now_ms": now_ms,
                                                         "progress": progress, "message": message})
        return str(reply[0]), str(reply[1]), str(reply[2]) if len(reply) > 2 else ""

    def complete_job(self, job_id: str, needs_class: str | None, node_id: str, attempt: int, now_ms: int,
                     meta: str, output: str, retention_ms: int,
                     job_health: dict[str, int] | None = None) -> list[Any]:
        """Apply a node's result; an error with ``node_fault`` counts against the node by the rules
        ``job_health`` (dispatcher.health.job_failure_rules; None: not counted). Returns ["succeeded" | "failed", kick,
        outcome JSON, assigned_ms, degraded], ["retry", kick, worker, degraded], ["stale", state], or
        ["need_kind"] when it would requeue the job and ``needs_class`` is None; kick "1" when a
        waiting job could take the freed slot; degraded, the JobFailures reason when the result
        degraded the node, else ""."""
        return list(self._job_call("complete_job", job_id, needs_class, {
            "node_id": node_id, "attempt": attempt, "now_ms": now_ms, "meta": meta, "output": output,
            "retention_ms": retention_ms, "job_health": job_health}, node_id=node_id))

    def release_job(self, job_id: str, needs_class: str, node_id: str, now_ms: int, code: str, message: str, *,
                    cancel_on_node: bool, only_if_offline: bool = False, only_if_due: bool = False,
                    retention_ms: int, job_health: dict[str, int] | None = None) -> list[Any]:
        """End an attempt without a result; with ``job_health`` (a timeout) it counts against the
        node as complete_job's node faults do. Returns ["retry", worker, degraded], ["failed", outcome
        JSON, degraded], ["kept"], ["gone"] or ["moved"]; degraded as complete_job's."""
        return list(self._job_call("release_job", job_id, needs_class, {
            "node_id": node_id, "now_ms": now_ms, "code": code, "message": message,
            "cancel_on_node": cancel_on_node, "only_if_offline": only_if_offline, "only_if_due": only_if_due,
            "retention_ms": retention_ms, "job_health": job_health}, node_id=node_id))

    def cancel_job(self, job_id: str, needs_class: str, node_id: str, now_ms: int, reason: str,
                   retention_ms: int) -> list[Any]:
        """Returns ["cancelled", node id or "", outcome JSON], ["finished", state], ["unknown"] or ["moved"]."""
        return list(self._job_call("cancel_job", job_id, needs_class, {
            "node_id": node_id, "now_ms": now_ms, "reason": reason, "retention_ms": retention_ms}, node_id=node_id))

    def note_waiting(self, job_id: str, nodes_key: str, steps: list[tuple[str, list[str], bool]], now_ms: int,
                     examples: int, budget: int) -> tuple[dict[str, Any], str] | None:
        """Write why a waiting job waits (its Celery WAITING state and last decision) from the
        filter's ``steps`` (reason, its index keys, whether its one key lists the nodes failing
        it). Returns the meta and the Celery worker that took the submission, or None when the
        job no longer waits."""
        keys = [nodes_key] + [key for _, step_keys, _ in steps for key in step_keys]
        reply = self._job_call("note_waiting", job_id, None, {
            "now_ms": now_ms,
            "steps": [[reason, len(step_keys), excluding] for reason, step_keys, excluding in steps],
            "examples": examples, "budget": budget}, extra_keys=keys)
        return (json.loads(reply[1]), str(reply[2])) if reply[0] == "noted" else None

    def expire_dispatch(self, job_id: str, needs_class: str, now_ms: int, message: str, exclusions: dict[str, Any],
                        retention_ms: int, at_once: bool = False) -> dict[str, Any] | None:
        """Fail a job still waiting at its dispatch deadline (``at_once``: before it). Returns its
        outcome when it did."""
        reply = self._job_call("expire_dispatch", job_id, needs_class, {
            "now_ms": now_ms, "message": message, "exclusions": exclusions, "retention_ms": retention_ms,
            "at_once": at_once})
        return json.loads(reply[1]) if reply[0] == "failed" else None

