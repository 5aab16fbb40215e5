"""One node's WebSocket session: frames in, frames out.

The session's own greenlet reads one frame at a time (``Transport.receive``),
validates it and hands it to the core; what goes to the node is queued on the
transport, whose writer sends it, popping the node's Redis queue when the hub
wakes the session. Nothing a node sends can make the loop raise: protocol
errors become ``error`` frames, store errors become ``INTERNAL_ERROR``, and
only the errors that say so close the session.

Before it registers, a session may send only a small frame, few of them, for
``registration_timeout_seconds``: what a client without a token costs is bounded.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from dispatcher.delivery import CONTROL_PREFIX, POP_BATCH, parse_control
from dispatcher.errors import (
    InvalidMessage,
    MessageTooLarge,
    NodeIdMismatch,
    NodeOffline,
    NotRegistered,
    ProtocolError,
    RateLimited,
    SessionSuperseded,
    StoreError,
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
from dispatcher.scripts import Reply
from dispatcher.vocabulary import CloseCode, ErrorCode
from web.transport import FrameTooLarge, Transport

if TYPE_CHECKING:
    from web.hub import Hub

log = logging.getLogger("web.session")

#: The largest frame a session may send before it registers: a node_register with
#: every list at its bound fits; a client without a token cannot make us hold more.
UNREGISTERED_FRAME_BYTES = 128 * 1024
#: What may wait to be sent to a session that has not registered (error frames only).
UNREGISTERED_BUFFER_BYTES = 64 * 1024
#: Frames the sender puts out per error it answers to a flood: the first, then one in this many.
_RATE_LIMIT_ANSWER_EVERY = 100


class TokenBucket:
    """Allows ``rate_per_s`` frames a second on average, bursts up to ``burst``."""

    __slots__ = ("rate_per_s", "burst", "tokens", "updated_s")

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
    """The server's side of one node's WebSocket, from handshake to close."""

    __slots__ = ("transport", "hub", "session_id", "node", "address", "next_report_s", "registration_deadline_s",
                 "_close_reason", "_bucket", "_rate_limited")

    def __init__(self, ws: Any, hub: Hub, address: str) -> None:
        s = hub.settings
        self.transport = Transport(ws, min(UNREGISTERED_FRAME_BYTES, s.max_message_bytes),
                                   UNREGISTERED_BUFFER_BYTES, s.ws_send_timeout_seconds)
        self.hub = hub
        self.session_id = secrets.token_hex(12)
        self.node: SessionNode | None = None
        #: The client address holding one of the hub's unregistered places until it registers.
        self.address = address
        self.next_report_s = 0.0
        self.registration_deadline_s = time.monotonic() + s.registration_timeout_seconds
        self._close_reason = "session closed"
        self._bucket = TokenBucket(s.max_messages_per_second, 2 * s.max_messages_per_second)
        self._rate_limited = 0

    @property
    def node_id(self) -> str | None:
        return self.node.node_id if self.node else None

    # --- the session's life ------------------------------------------------

    def run(self) -> None:
        """Serve the session until it closes. Never raises."""
        self.hub.opened(self)
        try:
            while True:
                try:
                    frame = self.transport.receive()
                except FrameTooLarge as exc:
                    self._refuse(MessageTooLarge(f"{exc}: max_message_bytes is {exc.limit}"
                                                 + ("" if self.node else " before registration")), None)
                    continue
                if frame is None:
                    break
                if self.transport.closing_since_s is None:  # once closing, frames are read only to reach the close
                    self._handle(frame)
                # A socket that always has data never makes recv wait, so it never yields by
                # itself: one frame, then every other session gets its turn.
                time.sleep(0)
        except Exception:  # the route must never let one escape
            log.exception("session_crashed", extra={"event": "session_crashed", "node_id": self.node_id})
        finally:
            self.transport.abort()
            self._end()

    def _end(self) -> None:
        self.hub.closed(self)
        if self.node is None:
            return
        try:
            previous = self.hub.registry.close_session(self.node.node_id, self.session_id, self._close_reason)
        except StoreError as exc:
            # The heartbeat timeout takes the node offline instead.
            log_event(log, "session_close_failed", logging.WARNING, node_id=self.node.node_id, error=str(exc))
            return
        # ("ignored": a newer session holds the node, or it was offline already: nothing changed)
        log_event(log, "session_ended", node_id=self.node.node_id, reason=self._close_reason,
                  outcome="went_offline" if previous is not None else "ignored")

    def close(self, code: int = CloseCode.NORMAL, reason: str = "", why: str | None = None) -> None:
        """Close from any greenlet, without waiting: what is queued goes first."""
        if why:
            self._close_reason = why
        self.transport.close(code, reason)

    # --- outgoing ----------------------------------------------------------

    def send(self, frame: str) -> bool:
        """Queue a frame for the node; never blocks (a node that does not read is cut off)."""
        return self.transport.send(frame)

    def wake(self) -> None:
        """Frames wait in the node's Redis queue: the writer fetches them once it is idle."""
        if self.node is not None:
            self.transport.want_refill(self._refill)

    def _refill(self) -> None:
        # Runs on the transport's writer greenlet: a Redis round trip blocks only this session.
        assert self.node is not None
        budget = self.hub.settings.max_message_bytes
        try:
            frames = self.hub.outbox.pop(self.node.node_id, self.session_id, budget)
        except StoreError as exc:
            log_event(log, "delivery_failed", logging.WARNING, node_id=self.node_id, error=str(exc))
            return  # the sweep wakes us again
        if frames is Reply.SUPERSEDED:
            self.close(CloseCode.SUPERSEDED, "superseded by a newer session", why="superseded")
            return
        for frame in frames:
            if frame.startswith(CONTROL_PREFIX):
                verb, code, reason = parse_control(frame)
                if verb == "close":
                    self.close(code, reason, why=reason)
                    return
                continue
            if not self.send(frame):
                # Job frames stay recorded as assigned and are queued again when the node resumes.
                return
        if frames and (len(frames) >= POP_BATCH or sum(map(len, frames)) >= budget):
            self.wake()  # a full batch: more may be waiting

    # --- incoming ----------------------------------------------------------

    def _handle(self, frame: str | bytes) -> None:
        ref_type = None
        try:
            if not self._bucket.take():
                self._flooded()
                return
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
        except StoreError as exc:
            log_event(log, "store_unavailable", logging.ERROR, node_id=self.node_id, ref_type=ref_type,
                      error=str(exc))
            self._error(ErrorCode.INTERNAL_ERROR, "the dispatcher's store is unavailable; send it again later",
                        ref_type)
            if ref_type == "job_result":
                # A lost heartbeat or progress frame is replaced by the next one; a
                # lost result is not. Ending the session makes the node resume, which
                # sends its job again, and a node sends a finished job's result again.
                self.close(CloseCode.INTERNAL, "job result not recorded: reconnect and resume",
                           why="result not recorded")
        except Exception:  # one bad frame must not end the session
            log.exception("frame_failed",
                          extra={"event": "frame_failed", "node_id": self.node_id, "ref_type": ref_type})
            self._error(ErrorCode.INTERNAL_ERROR, "internal error while handling the frame", ref_type)

    def _flooded(self) -> None:
        self._rate_limited += 1
        rate = self.hub.settings.max_messages_per_second
        if self.node is None:
            # Nothing legitimate sends a burst before its node_register is answered.
            self._refuse(RateLimited(f"more than {2 * rate:g} frames before registering"), None)
            self.close(CloseCode.POLICY, "too many frames before registration", why="flood before registration")
            return
        if self._rate_limited % _RATE_LIMIT_ANSWER_EVERY == 1:  # the first, then every hundredth
            log_event(log, "frames_rate_limited", logging.WARNING, node_id=self.node_id, dropped=self._rate_limited)
            self._refuse(RateLimited(f"more than {rate:g} frames per second; frames dropped "
                                     f"({self._rate_limited} so far)"), None)

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
            self.hub.jobs_from_node(self.node, msg)
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
        self.transport.max_frame_bytes = s.max_message_bytes
        # Room for one batch from the node's queue (about max_message_bytes) on top of a full frame.
        self.transport.max_buffered_bytes = 2 * s.max_message_bytes + UNREGISTERED_BUFFER_BYTES
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

    @property
    def settings(self) -> Any:
        return self.hub.settings

    def _on_heartbeat(self, msg: NodeHeartbeat) -> None:
        assert self.node is not None
        result = self.hub.registry.heartbeat(self.node, msg)
        if result.refused is Reply.SUPERSEDED:
            raise SessionSuperseded("superseded by a newer session")
        if result.refused is not None:
            raise NodeOffline(f"node {self.node.node_id} is offline: "
                              "register again (node_register with node_id and node_secret)")
        if result.outcome and result.outcome.transitioned:
            self.wake()
        if result.outcome and result.outcome.kick:
            self.hub.jobs.request_kick()
