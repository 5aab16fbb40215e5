"""The node registry: registration, heartbeats, session ends and the periodic scan.

Status rules live in the scripts; this module prepares their inputs (the
health verdict, the index keys a change touches), turns their replies into
results and logs what happened.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass, field

import redis

from dispatcher.batching import ScriptBatcher
from dispatcher.clock import Clock, now_ms
from dispatcher.errors import (
    InvalidMessage,
    InvalidTransition,
    NodeIdConflict,
    ScriptRetry,
    StoreError,
    Unauthorized,
    UnknownNode,
)
from dispatcher.health import HealthVerdict, check_health
from dispatcher.keys import Keys
from dispatcher.logs import log_event
from dispatcher.messages import InstalledModel, NodeHeartbeat, NodeRegister, valid_node_id
from dispatcher.metrics import HEARTBEATS, RUNNING_JOBS_MISMATCHES, TRANSITIONS
from dispatcher.scripts import (
    Cordoned,
    DrainExpired,
    DrainStarted,
    HeartbeatOutcome,
    Kept,
    Mismatch,
    NotOffline,
    Refused,
    Reply,
    Scripts,
    Undrained,
    WarmupDegraded,
    WentOffline,
)
from dispatcher.settings import Settings
from dispatcher.store import optional_texts, store_client, store_errors, texts, unwrapped
from dispatcher.vocabulary import ModelState, NodeStatus
from dispatcher.wording import plural

log = logging.getLogger("dispatcher.registry")

#: Attempts of a script whose optimistic read went stale (models or labels changed meanwhile).
_SCRIPT_ATTEMPTS = 5
#: Expired nodes the scan takes per batch from the liveness index.
_SCAN_BATCH = 500


def transitioned(node_id: str, from_status: str | None, to_status: str, reason: str) -> None:
    """Log and count one status transition (the scripts made it)."""
    log_event(log, "status_transition", node_id=node_id, from_status=from_status, to_status=to_status, reason=reason)
    TRANSITIONS.labels(from_status or "new", to_status).inc()


def hash_secret(secret: str) -> str:
    """Node secrets are 256-bit random tokens, so one SHA-256 is a safe stored form."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _indexed_under(stored_models: str | None, stored_labels: str | None) -> tuple[set[str], set[tuple[str, str]]]:
    """The model ids and labels of a stored node record (its JSON texts), as its indexes hold them."""
    return ({m["model_id"] for m in json.loads(stored_models or "[]")},
            set(json.loads(stored_labels or "{}").items()))


def _models_json(models: list[InstalledModel]) -> str:
    return json.dumps([m.model_dump(mode="json") for m in models], separators=(",", ":"))


@dataclass
class SessionNode:
    """What a session knows of its node between frames (it is the node's only writer)."""

    node_id: str
    session_id: str
    models: dict[str, str]
    gpu_count: int
    gpu_available: bool
    last_verdict: HealthVerdict | None = None
    #: Job id -> kind of needs, from the job's ack, for its result (saves a read).
    job_kinds: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Registration:
    node: SessionNode
    secret: str
    status: NodeStatus
    resumed: bool
    old_session_id: str


@dataclass(frozen=True)
class HeartbeatResult:
    #: None when the session no longer holds the node (see ``refused``).
    outcome: HeartbeatOutcome | None
    verdict: HealthVerdict
    #: Why the heartbeat was refused: SUPERSEDED, OFFLINE or UNKNOWN (None: it was not).
    refused: Reply | None = None


@dataclass(frozen=True)
class DrainOutcome:
    #: DRAINING (jobs still assigned) or OFFLINE (nothing was assigned).
    status: NodeStatus
    jobs_left: int


def undrained_message(node_id: str, status: str) -> str:
    """What an undrain leads to, for a person: the node's status and what happens next."""
    if status == NodeStatus.OFFLINE:
        return (f"node {node_id} is offline: it will be ready again when it reconnects and passes its "
                "health checks")
    if status == NodeStatus.DEGRADED:
        return f"node {node_id} is degraded: it takes jobs again once its health checks pass"
    return f"node {node_id} is {status}"


@dataclass
class ScanSummary:
    expired: list[str] = field(default_factory=list)
    warmup_degraded: list[str] = field(default_factory=list)
    drains_ended: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    suspected_partition: bool = False
    deferred: int = 0


class Registry:
    """Node records in Redis, changed only through the scripts."""

    def __init__(self, client: redis.Redis, settings: Settings, clock: Clock = now_ms,
                 batcher: ScriptBatcher | None = None, *, keys: Keys | None = None,
                 scripts: Scripts | None = None) -> None:
        #: Its commands raise StoreError (dispatcher/store.py), as do the scripts'.
        self.client = store_client(client)
        self.settings = settings
        # (given by dispatcher/core.py, which shares one of each among a process's parts)
        self.keys = keys or Keys(settings.key_prefix)
        self.scripts = scripts or Scripts(unwrapped(client), self.keys, batcher)
        self._batcher = batcher
        self.clock = clock

    # --- registration ------------------------------------------------------

    def register(self, msg: NodeRegister, session_id: str, web_id: str, now: int | None = None) -> Registration:
        """Accept a node_register frame, or raise the protocol error the node gets."""
        self._check_token(msg)
        now = self.clock() if now is None else now
        requested = msg.node_id
        generated = requested is None
        if requested is not None and not valid_node_id(requested):
            log_event(log, "registration_failed", logging.WARNING, node_id=requested[:80], why="invalid node_id")
            raise InvalidMessage("node_id: letters, digits, '-', '_' and '.' only, at most 64 characters")
        gpu_count = len(msg.hardware.gpus)
        fields = {
            "version": msg.version,
            "capability_schema_version": msg.capability_schema_version,
            "advanced_features": json.dumps(msg.advanced_features),
            "hardware": msg.hardware.model_dump_json(),
            "gpu_count": gpu_count,
            "gpu_available": gpu_count > 0,
            "models": _models_json(msg.installed_models),
            "labels": json.dumps(msg.labels, sort_keys=True),
            "accept_public": msg.accept_public_jobs,
            "max_concurrent_jobs": msg.max_concurrent_jobs,
        }
        ready_models = [m.model_id for m in msg.installed_models if m.status == ModelState.READY]
        labels_flat = [f"{k}={v}" for k, v in sorted(msg.labels.items())]

        for _ in range(_SCRIPT_ATTEMPTS):
            node_id = f"n-{secrets.token_hex(8)}" if requested is None else requested
            read = ("HMGET", self.keys.node(node_id), "secret_hash", "models", "labels")
            with store_errors():  # (the batcher's client is redis-py's)
                stored_hash, stored_models, stored_labels = (
                    self._batcher.command(*read) if self._batcher else self.client.execute_command(*read))
            if stored_hash is not None and (
                    not msg.node_secret or not hmac.compare_digest(stored_hash, hash_secret(msg.node_secret))):
                if generated:
                    continue
                log_event(log, "registration_conflict", logging.WARNING, node_id=node_id)
                raise NodeIdConflict()
            secret = msg.node_secret if (msg.node_secret and not generated) else secrets.token_urlsafe(32)
            old_models, old_labels = _indexed_under(stored_models, stored_labels)
            extra_keys, index_params = self._index_entries(
                old_models | {m.model_id for m in msg.installed_models}, old_labels | set(msg.labels.items()))
            try:
                registered = self.scripts.register_node(node_id, extra_keys, {
                    "secret_hash": hash_secret(secret),
                    "session_id": session_id,
                    "web_id": web_id,
                    "now_ms": now,
                    "expected_models": stored_models,
                    "expected_labels": stored_labels,
                    "fields": fields,
                    "ready_models": ready_models,
                    "labels_flat": labels_flat,
                    **index_params,
                })
            except ScriptRetry:
                continue
            except NodeIdConflict:
                if generated:
                    continue
                log_event(log, "registration_conflict", logging.WARNING, node_id=node_id)
                raise
            resumed = registered.resumed
            log_event(log, "registration_ok", node_id=node_id, resumed=resumed, session_id=session_id,
                      web_id=web_id, models=ready_models, max_concurrent_jobs=msg.max_concurrent_jobs)
            transitioned(node_id, None, registered.status, "resumed" if resumed else "registered")
            node = SessionNode(node_id, session_id, {m.model_id: m.status.value for m in msg.installed_models},
                               gpu_count, gpu_count > 0)
            return Registration(node, secret, registered.status, resumed, registered.old_session_id)
        raise StoreError(f"registration of {node_id} kept racing with another; try again")

    def _check_token(self, msg: NodeRegister) -> None:
        tokens = self.settings.registration_tokens
        if not tokens:
            return
        given = (msg.registration_token or "").encode()
        # Compare with every token so the time taken does not tell which one nearly matched.
        matched = [hmac.compare_digest(given, t.get_secret_value().encode()) for t in tokens]
        if not any(matched):
            log_event(log, "registration_failed", logging.WARNING, node_id=(msg.node_id or "")[:80] or None,
                      why="registration token missing or not accepted")
            raise Unauthorized("registration token missing or not accepted")

    # --- heartbeats --------------------------------------------------------

    def heartbeat(self, node: SessionNode, msg: NodeHeartbeat, now: int | None = None) -> HeartbeatResult:
        """Record a heartbeat of the session's node and apply its status rules."""
        now = self.clock() if now is None else now
        models = node.models if msg.installed_models is None else {
            m.model_id: m.status.value for m in msg.installed_models}
        gpu_available = node.gpu_available if msg.gpu_available is None else msg.gpu_available
        s = self.settings
        verdict = check_health(models, node.gpu_count, gpu_available, s.required_models, s.require_gpu)
        usage = msg.resource_usage
        params = {
            "session_id": node.session_id,
            "now_ms": now,
            "healthy": verdict.healthy,
            "health_reason": verdict.reason,
            "cpu": usage.cpu_percent,
            "gpu": usage.gpu_percent,
            "mem": usage.mem_percent,
            "running_jobs": usage.running_jobs,
            "gpu_available": gpu_available,
            "models": None if msg.installed_models is None else _models_json(msg.installed_models),
            "resource_threshold": s.resource_threshold_percent,
            "success_threshold": s.health_check_success_threshold,
            "window_size": s.failure_rate_window_size,
            "failure_rate_threshold": s.failure_rate_threshold,
            "consecutive_failure_threshold": s.consecutive_failure_threshold,
            "warmup_ms": int(s.warmup_timeout_seconds * 1000),
            "mismatch_heartbeats": s.running_jobs_mismatch_heartbeats,
        }
        index_models = set(node.models) | set(models) if msg.installed_models is not None else set()
        for _ in range(_SCRIPT_ATTEMPTS):
            index_model_ids = sorted(index_models)
            params["index_models"] = index_model_ids
            try:
                outcome = self.scripts.record_heartbeat(node.node_id, self.keys.model_indexes(index_model_ids), params)
                break
            except ScriptRetry as retry:
                index_models |= {m["model_id"] for m in json.loads(retry.stored or "[]")}
        else:
            raise StoreError(f"heartbeat of {node.node_id}: model list kept changing")

        if isinstance(outcome, Reply):
            return HeartbeatResult(None, verdict, refused=outcome)
        node.models, node.gpu_available = models, gpu_available
        if node.last_verdict != verdict:
            log_event(log, "health_check", node_id=node.node_id, healthy=verdict.healthy,
                      health_reason=verdict.reason, status=outcome.status)
        node.last_verdict = verdict
        HEARTBEATS.labels("true" if verdict.healthy else "false").inc()
        if outcome.transitioned:
            transitioned(node.node_id, outcome.previous_status, outcome.status, outcome.reason)
        if outcome.mismatch is Mismatch.BEGAN:
            log_event(log, "running_jobs_mismatch", logging.WARNING, node_id=node.node_id,
                      running_jobs=usage.running_jobs, assigned_jobs=outcome.assigned,
                      heartbeats=s.running_jobs_mismatch_heartbeats)
            RUNNING_JOBS_MISMATCHES.inc()
        elif outcome.mismatch is Mismatch.ENDED:
            log_event(log, "running_jobs_reconciled", node_id=node.node_id, running_jobs=usage.running_jobs)
        return HeartbeatResult(outcome, verdict)

    # --- draining ------------------------------------------------------------

    def drain(self, node_id: str, requested_by: str, reason: str, deadline_s: float | None = None,
              now: int | None = None) -> DrainOutcome:
        """Stop new jobs for a ready or degraded node; it goes offline once its jobs finish
        (or at the deadline, when what is left is dispatched elsewhere)."""
        now = self.clock() if now is None else now
        deadline_ms = None if deadline_s is None else now + int(deadline_s * 1000)
        started = self.scripts.drain_node(node_id, now, requested_by, reason, deadline_ms)
        if started is Reply.UNKNOWN:
            raise UnknownNode(f"no node {node_id}")
        if isinstance(started, Refused):
            raise InvalidTransition(f"node {node_id} is {started.status}: only a ready or degraded node can be "
                                    "drained")
        assert isinstance(started, DrainStarted)
        log_event(log, "drain_started", node_id=node_id, requested_by=requested_by, reason=reason,
                  deadline_ms=deadline_ms, jobs_left=started.jobs_left)
        transitioned(node_id, started.previous, NodeStatus.DRAINING, f"drain requested by {requested_by}: {reason}")
        if started.drained:
            transitioned(node_id, NodeStatus.DRAINING, NodeStatus.OFFLINE, "drained: no jobs were assigned")
            return DrainOutcome(NodeStatus.OFFLINE, 0)
        return DrainOutcome(NodeStatus.DRAINING, started.jobs_left)

    def undrain(self, node_id: str, requested_by: str, now: int | None = None) -> NodeStatus:
        """End a drain. Returns the node's status now (``offline`` while a drained
        node reconnects to warm up again: ``undrained_message`` says so)."""
        now = self.clock() if now is None else now
        ended = self.scripts.undrain_node(node_id, now, requested_by)
        if ended is Reply.UNKNOWN:
            raise UnknownNode(f"no node {node_id}")
        if isinstance(ended, Refused):
            raise InvalidTransition(f"node {node_id} is {ended.status} and not drained: nothing to undrain")
        if isinstance(ended, Undrained):
            log_event(log, "drain_ended", node_id=node_id, requested_by=requested_by, outcome="resumed")
            transitioned(node_id, NodeStatus.DRAINING, ended.status, f"drain ended by {requested_by}")
            return ended.status
        # Drained (it reconnects to warm up again: RECONNECT) or away mid-drain (CANCELLED).
        log_event(log, "drain_ended", node_id=node_id, requested_by=requested_by, outcome=ended)
        return NodeStatus.OFFLINE

    # --- cordons and forgetting ---------------------------------------------

    def cordon(self, node_id: str, requested_by: str, reason: str, now: int | None = None) -> NodeStatus:
        """Keep a node from new jobs; it keeps its status, session and jobs. Returns its status."""
        now = self.clock() if now is None else now
        cordoned = self.scripts.cordon_node(node_id, now, requested_by, reason)
        if not isinstance(cordoned, Cordoned):
            raise UnknownNode(f"no node {node_id}")
        log_event(log, "node_cordoned", node_id=node_id, requested_by=requested_by, reason=reason,
                  status=cordoned.status, already=cordoned.already)
        return cordoned.status

    def uncordon(self, node_id: str, requested_by: str, now: int | None = None) -> NodeStatus:
        """End a cordon (nothing to do when there is none). Returns the node's status."""
        now = self.clock() if now is None else now
        uncordoned = self.scripts.uncordon_node(node_id, now)
        if uncordoned is Reply.UNKNOWN:
            raise UnknownNode(f"no node {node_id}")
        log_event(log, "node_uncordoned", node_id=node_id, requested_by=requested_by, status=uncordoned.status,
                  was_cordoned=uncordoned.was_cordoned)
        return uncordoned.status

    def forget(self, node_id: str, requested_by: str, now: int | None = None) -> None:
        """Delete an offline node's record, secret, history and index entries at once (an
        operator's request; the scan does the same after offline_node_retention_seconds).
        Raises UnknownNode, or InvalidTransition for a node that is not offline, still has its
        session and is heard from (its agent would register again at once) or still holds jobs."""
        now = self.clock() if now is None else now
        # A node whose session is open (a drained node keeps its session) is kept while it is
        # heard from; one whose session closed goes at once (were it to connect again meanwhile,
        # it would no longer be offline, and the script would refuse).
        connected = self.client.hget(self.keys.node(node_id), "connected") == "1"
        retention_ms = int(self.settings.heartbeat_timeout_seconds * 1000) if connected else 0
        outcome = self._forget(node_id, now, retention_ms)
        if outcome is None:
            raise StoreError(f"node {node_id} kept changing while being forgotten")
        if outcome is Reply.UNKNOWN:
            raise UnknownNode(f"no node {node_id}")
        if isinstance(outcome, NotOffline):
            raise InvalidTransition(f"node {node_id} is {outcome.status}: only an offline node can be forgotten "
                                    "(drain it first)")
        if outcome is Kept.SEEN:
            raise InvalidTransition(f"node {node_id} is offline but its session is open (a drained node): its "
                                    "agent would register again at once; stop the agent first")
        if outcome is Kept.JOBS:
            jobs = self.client.hlen(self.keys.assigned(node_id))
            raise InvalidTransition(f"node {node_id} still holds {plural(jobs, 'job')}, sent to other nodes once "
                                    "job_reassign_grace_seconds pass: forget it after that")
        log_event(log, "node_forgotten", node_id=node_id, requested_by=requested_by)

    def _forget(self, node_id: str, now: int, retention_ms: int) -> Kept | NotOffline | Reply | None:
        """Run forget_node with the node's index entries as stored (read again if they change;
        None when they kept changing)."""
        for _ in range(_SCRIPT_ATTEMPTS):
            stored = self.client.hmget(self.keys.node(node_id), "models", "labels")
            stored_models, stored_labels = optional_texts(stored)
            extra_keys, index_params = self._index_entries(*_indexed_under(stored_models, stored_labels))
            try:
                return self.scripts.forget_node(node_id, extra_keys, {
                    "now_ms": now, "retention_ms": retention_ms,
                    "expected_models": stored_models, "expected_labels": stored_labels, **index_params})
            except ScriptRetry:
                continue
        return None

    # --- session ends and the scan -----------------------------------------

    def close_session(self, node_id: str, session_id: str, reason: str = "session closed",
                      now: int | None = None) -> NodeStatus | None:
        """The session ended: the node goes offline unless a newer session holds it. Returns
        the node's status before, or None when nothing changed."""
        now = self.clock() if now is None else now
        closed = self.scripts.close_session(node_id, session_id, reason, now, self._grace_ms())
        if not isinstance(closed, WentOffline):
            return None
        transitioned(node_id, closed.previous, NodeStatus.OFFLINE, reason)
        return closed.previous

    def scan(self, now: int | None = None) -> ScanSummary:
        """Heartbeat and warmup timeouts, read from indexes (never every node)."""
        now = self.clock() if now is None else now
        s = self.settings
        summary = ScanSummary()
        timeout_ms = int(s.heartbeat_timeout_seconds * 1000)
        silent = texts(self.client.zrangebyscore(self.keys.liveness(), "-inf", now - timeout_ms))
        budget = self._expiry_budget(len(silent), summary)
        for node_id in silent[:budget]:
            expired = self.scripts.expire_node(node_id, now, timeout_ms, self._grace_ms())
            if isinstance(expired, WentOffline):
                summary.expired.append(node_id)
                transitioned(node_id, expired.previous, NodeStatus.OFFLINE, expired.reason)
        warmup_ms = int(s.warmup_timeout_seconds * 1000)
        for node_id in texts(self.client.zrangebyscore(self.keys.warmup(), "-inf", now - warmup_ms, 0, _SCAN_BATCH)):
            degraded = self.scripts.expire_warmup(node_id, now, warmup_ms)
            if isinstance(degraded, WarmupDegraded):
                summary.warmup_degraded.append(node_id)
                transitioned(node_id, NodeStatus.REGISTERING, NodeStatus.DEGRADED, degraded.reason)
        for node_id in texts(self.client.zrangebyscore(self.keys.drains(), "-inf", now, 0, _SCAN_BATCH)):
            ended = self.scripts.expire_drain(node_id, now)
            if isinstance(ended, DrainExpired):
                summary.drains_ended.append(node_id)
                transitioned(node_id, NodeStatus.DRAINING, NodeStatus.OFFLINE,
                             f"drain deadline passed with {plural(ended.jobs_handed_back, 'job')} left")
        if s.offline_node_retention_seconds:
            summary.forgotten = self._forget_long_gone(now, int(s.offline_node_retention_seconds * 1000))
        self.client.hset(self.keys.scan_state(), mapping={
            "at_ms": now, "expired": len(summary.expired), "warmup_degraded": len(summary.warmup_degraded),
            "suspected_partition": int(summary.suspected_partition), "deferred": summary.deferred,
            "forgotten": len(summary.forgotten)})
        # A scan that changed nothing says so at DEBUG: a quiet fleet logs nothing every scan.
        changed = summary.expired or summary.warmup_degraded or summary.drains_ended or summary.forgotten
        log_event(log, "scan_summary", logging.INFO if changed or summary.suspected_partition else logging.DEBUG,
                  expired=len(summary.expired), warmup_degraded=len(summary.warmup_degraded),
                  drains_ended=len(summary.drains_ended), forgotten=len(summary.forgotten),
                  suspected_partition=summary.suspected_partition, deferred=summary.deferred)
        return summary

    def _forget_long_gone(self, now: int, retention_ms: int) -> list[str]:
        """Delete the nodes offline and unseen for the retention, so that the
        records of nodes that never come back (a container that lost its state
        file registers anew) do not pile up in Redis, the API and the page."""
        forgotten = []
        for node_id in texts(self.client.zrangebyscore(self.keys.offline_since(), "-inf", now - retention_ms,
                                                       0, _SCAN_BATCH)):
            if self._forget(node_id, now, retention_ms) is Reply.FORGOTTEN:  # (None: changing all the time)
                forgotten.append(node_id)
                log_event(log, "node_forgotten", node_id=node_id, retention_s=retention_ms // 1000)
        return forgotten

    def _index_entries(self, models: set[str],
                       labels: set[tuple[str, str]]) -> tuple[list[str], dict[str, list[str]]]:
        """The model and label index keys a node script may change, and the
        ``index_models`` / ``index_labels`` parameters naming them, in the same order."""
        index_models, index_labels = sorted(models), sorted(labels)
        keys = self.keys.model_indexes(index_models) + self.keys.label_indexes(index_labels)
        return keys, {"index_models": index_models, "index_labels": [f"{k}={v}" for k, v in index_labels]}

    def _expiry_budget(self, silent: int, summary: ScanSummary) -> int:
        """How many silent nodes this scan may take offline.

        When more than ``partition_offline_fraction`` of the live fleet falls
        silent at once, the likelier story is that we lost them (our network,
        a stalled Redis), not that they all died: expire only a few per scan
        so that nothing is stampeded offline and re-dispatched at once.
        """
        s = self.settings
        live = self.client.zcard(self.keys.liveness())
        if silent <= s.partition_offline_per_scan or silent <= s.partition_offline_fraction * live:
            return silent
        summary.suspected_partition = True
        summary.deferred = silent - s.partition_offline_per_scan
        log_event(log, "partition_suspected", logging.WARNING, silent=silent, live=live,
                  expiring_now=s.partition_offline_per_scan, deferred=summary.deferred)
        return s.partition_offline_per_scan

    def _grace_ms(self) -> int:
        return int(self.settings.reassign_grace_seconds * 1000)
