"""The web process's node sessions, and the shared machinery that serves them.

One hub per process: a map of the sessions it holds, one wake listener, and
one ticker that sweeps for missed wake-ups and sends the periodic
node_status reports in batches. Per session there is only the receive loop
and a sender that sleeps until woken.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from dispatcher.connection import pubsub_client
from dispatcher.delivery import Outbox, WakeListener
from dispatcher.errors import InvalidMessage, InvalidTransition, StoreError
from dispatcher.fleet import Fleet
from dispatcher.jobs import Jobs
from dispatcher.logs import log_event, report_gc_pauses
from dispatcher.messages import JobAck, JobProgress, JobResult, NodeDrain
from dispatcher.metrics import SESSIONS
from dispatcher.registry import Registry, SessionNode
from dispatcher.settings import Settings
from dispatcher.vocabulary import CloseCode
from web.admission import WaitingRoom

if TYPE_CHECKING:
    from web.session import NodeSession

log = logging.getLogger("web.hub")

#: Sessions handled per Redis pipeline in the sweep and the status reports;
#: between chunks the thread yields, so thousands of sessions never stall the loop
#: (250 reports built at once held every heartbeat for tens of ms at 10,000 sessions).
_CHUNK = 50
#: Jobs per session whose kind of needs is remembered between their ack and their result.
_KINDS_REMEMBERED = 256


class Hub:
    """The sessions one web process holds, and the shared work that serves them:
    admission, the wake listener, the ticker. Nothing here waits on one peer."""

    def __init__(self, registry: Registry, jobs: Jobs, settings: Settings, *, fleet: Fleet | None = None,
                 outbox: Outbox | None = None) -> None:
        self.registry = registry
        self.jobs = jobs
        self.settings = settings
        self.keys = registry.keys
        # (web/app.py gives the core's: dispatcher/core.py)
        self.fleet = fleet or Fleet(registry.client, settings, registry.clock)
        self.outbox = outbox or Outbox(registry.client, registry.scripts, registry.keys)
        self.web_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        #: Registered sessions, by node id.
        self.sessions: dict[str, NodeSession] = {}
        #: Every open session, registered or not.
        self.connections: set[NodeSession] = set()
        #: Sessions not yet registered.
        self.waiting_room = WaitingRoom(settings.max_unregistered_sessions_per_address,
                                        settings.max_unregistered_sessions)
        #: Handshakes refused since the ticker last logged them, by reason.
        self.refused: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._started = False
        self._listener: WakeListener | None = None
        self._stopping: Callable[[], bool] = lambda: False

    # --- admission and sessions ------------------------------------------------

    def admit(self, address: str, origin: str | None) -> tuple[int, str] | None:
        """Whether a new session may open: None, or the HTTP status and reason to refuse it."""
        s = self.settings
        if origin is not None and origin not in s.allowed_origins:
            return 403, f"origin {origin[:100]!r} is not allowed (allowed_origins)"
        if len(self.connections) >= s.max_sessions:
            return 503, f"this web process holds its most sessions ({s.max_sessions}); try another or later"
        why = self.waiting_room.refusal(address)
        return None if why is None else (503, why)

    def count_refusal(self, status: int, why: str) -> None:
        # Logged in sums by the ticker: a flood of handshakes must not become a flood of log lines.
        self.refused[f"{status} {why.split(';')[0].split(' from ')[0]}"] += 1

    def opened(self, session: NodeSession) -> None:
        self.connections.add(session)
        self.waiting_room.enter(session, session.address)

    def closed(self, session: NodeSession) -> None:
        self.connections.discard(session)
        self.waiting_room.leave(session, session.address)
        with self._lock:
            if session.node_id is not None and self.sessions.get(session.node_id) is session:
                del self.sessions[session.node_id]
                SESSIONS.set(len(self.sessions))

    def attach(self, session: NodeSession) -> None:
        """The session registered its node; an older local session of that node closes."""
        assert session.node_id is not None
        self.waiting_room.leave(session, session.address)
        with self._lock:
            older = self.sessions.get(session.node_id)
            self.sessions[session.node_id] = session
            SESSIONS.set(len(self.sessions))
        if older is not None and older is not session:
            older.close(CloseCode.SUPERSEDED, "superseded by a newer session", why="superseded")

    def session_count(self) -> int:
        return len(self.sessions)

    def stop_when(self, stopping: Callable[[], bool]) -> None:
        """When ``stopping()`` turns true, close every session (CloseCode.RESTARTING) so that nodes
        reconnect elsewhere at once instead of waiting out the server's shutdown."""
        self._stopping = stopping

    def close_all(self, code: int, reason: str) -> None:
        sessions = list(self.connections)
        for session in sessions:
            session.close(code, reason, why=reason)
        log_event(log, "sessions_closed", sessions=len(sessions), reason=reason)

    # --- frames the core handles ---------------------------------------------------

    def jobs_from_node(self, node: SessionNode, msg: JobAck | JobProgress | JobResult) -> None:
        if isinstance(msg, JobResult):
            self.jobs.report_result(node.node_id, msg, node.job_kinds.pop(msg.job_id, None))
            return
        kind = self.jobs.ack(node.node_id, msg)
        if kind is not None:
            # Remembered for the job's result (a job that never sends one is dropped in turn).
            node.job_kinds[msg.job_id] = kind
            if len(node.job_kinds) > _KINDS_REMEMBERED:
                del node.job_kinds[next(iter(node.job_kinds))]

    def drain_from_node(self, node_id: str, msg: NodeDrain) -> None:
        try:
            self.registry.drain(node_id, requested_by=f"node {node_id}", reason=msg.reason,
                                deadline_s=msg.deadline_seconds)
        except InvalidTransition as exc:
            raise InvalidMessage(f"node_drain: {exc}") from exc

    # --- background work ---------------------------------------------------

    def start(self) -> None:
        """Start the listener and the ticker once per process (after gunicorn forks)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self._listener = WakeListener(pubsub_client(self.settings), self.keys, self._on_wake, self.sweep)
        self._listener.start()
        threading.Thread(target=self._tick_loop, name="hub-ticker", daemon=True).start()
        log_event(log, "hub_started", web_id=self.web_id)

    def _on_wake(self, node_id: str) -> None:
        session = self.sessions.get(node_id)
        if session is not None:
            session.wake()

    def first_report_s(self) -> float:
        """When a new session's first periodic report is due: jittered, so that a
        fleet reconnecting together does not come due on one tick."""
        interval_s = self.settings.status_report_interval_seconds
        return time.monotonic() + interval_s * random.uniform(0.5, 1.0)

    def sweep(self) -> None:
        """Wake every local session whose queue holds frames (catches lost wake-ups)."""
        node_ids = list(self.sessions)
        for start in range(0, len(node_ids), _CHUNK):
            for node_id in self.outbox.pending(node_ids[start:start + _CHUNK]):
                self._on_wake(node_id)
            time.sleep(0)

    def report_statuses(self) -> None:
        """Send the periodic node_status to every session that is due."""
        now_s = time.monotonic()
        due = [s for s in list(self.sessions.values()) if s.next_report_s <= now_s and s.node_id]
        interval_s = self.settings.status_report_interval_seconds
        for start in range(0, len(due), _CHUNK):
            chunk = due[start:start + _CHUNK]
            reports = self.fleet.status_reports([s.node_id for s in chunk if s.node_id])
            for session in chunk:
                session.next_report_s = now_s + interval_s
                report = reports.get(session.node_id or "")
                # A report is only news of the present: a node still behind on what was sent misses one.
                if report is not None and session.transport.buffered_bytes() == 0:
                    session.send(report.encode())
            time.sleep(0)

    def keep_time(self) -> None:
        """Per-session deadlines, for every open session: registration, the close
        handshake, pings. Never waits: each action only queues or cuts."""
        now_s = time.monotonic()
        ping_s = self.settings.ws_ping_interval_seconds
        for i, session in enumerate(list(self.connections)):
            transport = session.transport
            if transport.overdue(now_s):
                transport.abort()
            elif session.node is None and now_s > session.registration_deadline_s:
                session.close(CloseCode.POLICY, "registration timeout: send node_register first",
                              why="registration timeout")
            elif ping_s is not None and now_s - transport.last_received_s > ping_s:
                if not transport.ping_sent:
                    transport.ping()
                elif now_s - transport.last_received_s > 2 * ping_s:
                    transport.abort()  # no pong, nothing else either: the peer is gone
            if i % _CHUNK == _CHUNK - 1:
                time.sleep(0)

    def _tick_loop(self) -> None:
        tick_s = min(1.0, self.settings.status_report_interval_seconds)
        next_sweep_s = time.monotonic() + self.settings.delivery_sweep_interval_seconds
        while True:
            time.sleep(tick_s)
            if self._stopping():
                self.close_all(CloseCode.RESTARTING, "server restarting: reconnect")
                return
            try:
                self.keep_time()
                if self.refused:
                    refused, self.refused = self.refused, Counter()
                    log_event(log, "sessions_refused", logging.WARNING, refused=dict(refused))
                if time.monotonic() >= next_sweep_s:
                    next_sweep_s = time.monotonic() + self.settings.delivery_sweep_interval_seconds
                    self.sweep()
                self.report_statuses()
                report_gc_pauses()
            except StoreError as exc:
                log_event(log, "hub_tick_failed", logging.WARNING, error=str(exc))
            except Exception:  # the ticker must outlive any one bad tick
                log.exception("hub_tick_crashed", extra={"event": "hub_tick_crashed"})
