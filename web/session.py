"""One node's WebSocket session: frames in, frames out.

The receive loop validates each frame and hands it to the core; a sender
thread (a greenlet under gevent) pops the node's queue when the hub wakes it.
Nothing a node sends can make the loop raise: protocol errors become ``error``
frames, store errors become ``INTERNAL_ERROR``, and only the errors that say so
close the session.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

import redis
from simple_websocket import ConnectionClosed

from dispatcher.delivery import CONTROL_PREFIX, parse_control
from dispatcher.errors import (
    InvalidMessage,
    MessageTooLarge,
    NodeIdMismatch,
    NodeOffline,
    NotRegistered,
    ProtocolError,
    RateLimited,
    SessionSuperseded,
)
from dispatcher.logs import log_event
from dispatcher.messages import (
    DecodeError,
    ErrorMessage,
    JobAck,
    JobProgress,
    JobResult,
    NodeDrain,
    NodeHeartbeat,
    NodeRegister,
    NodeRegisterAck,
    decode_node_message,
)
from dispatcher.registry import SessionNode

if TYPE_CHECKING:
    from web.hub import Hub

log = logging.getLogger("web.session")


class TokenBucket:
    """Allows ``rate_per_s`` frames a second on average, bursts up to ``burst``."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.updated_s = time.monotonic()

    def take(self) -> bool:
        now_s = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now_s - self.updated_s) * self.rate_per_s)
        self.updated_s = now_s
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class NodeSession:
    def __init__(self, ws: Any, hub: Hub) -> None:
        self.ws = ws
        self.hub = hub
        self.settings = hub.settings
        self.session_id = secrets.token_hex(12)
        self.node: SessionNode | None = None
        self.next_report_s = 0.0
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._close_reason = "session closed"
        self._bucket = TokenBucket(self.settings.max_messages_per_second, 2 * self.settings.max_messages_per_second)
        self._rate_limited = 0

    @property
    def node_id(self) -> str | None:
        return self.node.node_id if self.node else None

    # --- the session's life ------------------------------------------------

    def run(self) -> None:
        """Serve the session until it closes. Never raises."""
        sender = threading.Thread(target=self._send_loop, name=f"sender-{self.session_id}", daemon=True)
        sender.start()
        try:
            while not self._closed:
                frame = self.ws.receive()
                if frame is None:
                    continue
                self._handle(frame)
        except ConnectionClosed:
            pass
        except Exception:  # the route must never let one escape
            log.exception("session_crashed", extra={"event": "session_crashed", "node_id": self.node_id})
        finally:
            self._closed = True
            self._wake.set()
            self._end()

    def _end(self) -> None:
        self.hub.detach(self)
        if self.node is None:
            return
        try:
            self.hub.registry.close_session(self.node.node_id, self.session_id, self._close_reason)
        except redis.RedisError as exc:
            # The heartbeat timeout takes the node offline instead.
            log_event(log, "session_close_failed", logging.WARNING, node_id=self.node.node_id, error=str(exc))

    def close(self, code: int = 1000, reason: str = "", why: str | None = None) -> None:
        """Close from any thread; the receive loop then ends."""
        if self._closed:
            return
        self._closed = True
        if why:
            self._close_reason = why
        with self._send_lock:
            try:
                self.ws.close(code, reason)
            except Exception:  # noqa: BLE001 - already closed or broken; either way it is over
                pass
        # simple-websocket's close does not wake a blocked receive(); this does.
        self.ws.event.set()
        self._wake.set()

    # --- outgoing ----------------------------------------------------------

    def send(self, frame: str) -> bool:
        with self._send_lock:
            if self._closed:
                return False
            try:
                self.ws.send(frame)
                return True
            except (ConnectionClosed, OSError):
                return False

    def wake(self) -> None:
        self._wake.set()

    def _send_loop(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            if self._closed or self.node is None:
                continue
            try:
                frames = self.hub.outbox.pop(self.node.node_id, self.session_id)
            except redis.RedisError as exc:
                log_event(log, "delivery_failed", logging.WARNING, node_id=self.node_id, error=str(exc))
                continue  # the sweep wakes us again
            if frames is None:
                self.close(4001, "superseded by a newer session", why="superseded")
                return
            for frame in frames:
                if frame.startswith(CONTROL_PREFIX):
                    verb, code, reason = parse_control(frame)
                    if verb == "close":
                        self.close(code, reason[:120], why=reason)
                        return
                    continue
                if not self.send(frame):
                    # Job frames stay recorded as assigned and are queued again when the node resumes.
                    return

    # --- incoming ----------------------------------------------------------

    def _handle(self, frame: str | bytes) -> None:
        ref_type = None
        try:
            size = len(frame.encode() if isinstance(frame, str) else frame)
            if size > self.settings.max_message_bytes:
                raise MessageTooLarge(f"frame of {size} bytes exceeds max_message_bytes {self.settings.max_message_bytes}")
            if not self._bucket.take():
                self._rate_limited += 1
                if self._rate_limited % 100 == 1:  # the first, then every hundredth
                    log_event(log, "frames_rate_limited", logging.WARNING, node_id=self.node_id,
                              dropped=self._rate_limited)
                raise RateLimited(f"more than {self.settings.max_messages_per_second:g} frames per second; frame dropped")
            try:
                msg = decode_node_message(frame)
            except DecodeError as exc:
                ref_type = exc.ref_type
                if self.node is None and ref_type not in (None, "node_register"):
                    raise NotRegistered("register first: send node_register") from exc
                raise InvalidMessage(str(exc)) from exc
            ref_type = msg.type
            self._dispatch(msg)
        except ProtocolError as exc:
            self._refuse(exc, ref_type)
        except redis.RedisError as exc:
            log_event(log, "store_unavailable", logging.ERROR, node_id=self.node_id, ref_type=ref_type, error=str(exc))
            self._error("INTERNAL_ERROR", "the dispatcher's store is unavailable; send it again later", ref_type)
            if ref_type == "job_result":
                # A lost heartbeat or progress frame is replaced by the next one; a
                # lost result is not. Ending the session makes the node resume, which
                # sends its job again, and a node sends a finished job's result again.
                self.close(1011, "job result not recorded: reconnect and resume", why="result not recorded")
        except Exception:  # noqa: BLE001 - one bad frame must not end the session
            log.exception("frame_failed", extra={"event": "frame_failed", "node_id": self.node_id, "ref_type": ref_type})
            self._error("INTERNAL_ERROR", "internal error while handling the frame", ref_type)

    def _refuse(self, exc: ProtocolError, ref_type: str | None) -> None:
        if not isinstance(exc, SessionSuperseded):
            self._error(exc.code, str(exc), ref_type)
        if exc.close_code is not None:
            self.close(exc.close_code, str(exc)[:120], why=str(exc))

    def _error(self, code: str, message: str, ref_type: str | None) -> None:
        self.send(ErrorMessage(code=code, message=message, ref_type=ref_type).encode())

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, NodeRegister):
            self._on_register(msg)
            return
        if self.node is None:
            raise NotRegistered("register first: send node_register")
        if msg.node_id is not None and msg.node_id != self.node.node_id:
            raise NodeIdMismatch(f"this session speaks for {self.node.node_id}, not {msg.node_id}")
        if isinstance(msg, NodeHeartbeat):
            self._on_heartbeat(msg)
        elif isinstance(msg, (JobAck, JobProgress, JobResult)):
            self.hub.jobs_from_node(self.node.node_id, msg)
        elif isinstance(msg, NodeDrain):
            self.hub.drain_from_node(self.node.node_id, msg)

    def _on_register(self, msg: NodeRegister) -> None:
        if self.node is not None:
            if msg.node_id not in (None, self.node.node_id):
                raise NodeIdMismatch(f"this session speaks for {self.node.node_id}, not {msg.node_id}")
            raise InvalidMessage(f"node_register: this session is already registered as {self.node.node_id}")
        registration = self.hub.registry.register(msg, self.session_id, self.hub.web_id)
        self.node = registration.node
        s = self.settings
        self.send(NodeRegisterAck(
            node_id=self.node.node_id,
            node_secret=registration.secret,
            status=registration.status,
            heartbeat_interval_seconds=s.heartbeat_interval_seconds,
            heartbeat_timeout_seconds=s.heartbeat_timeout_seconds,
        ).encode())
        self.next_report_s = self.hub.first_report_s()
        self.hub.attach(self)
        self.wake()

    def _on_heartbeat(self, msg: NodeHeartbeat) -> None:
        assert self.node is not None
        result = self.hub.registry.heartbeat(self.node, msg)
        if result.refused == "superseded":
            raise SessionSuperseded("superseded by a newer session")
        if result.refused is not None:
            raise NodeOffline(f"node {self.node.node_id} is offline: register again (node_register with node_id and node_secret)")
        if result.outcome and result.outcome.transitioned:
            self.wake()
        if result.outcome and result.outcome.kick:
            self.hub.jobs.request_kick()
