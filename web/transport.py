"""One node's WebSocket, read and written by its session, with bounds on both sides.

simple-websocket (under flask-sock) does the handshake; then this module owns
the socket, because its reader thread would not hold a peer to anything:

- Reading: simple-websocket reads every frame that arrives into a list while
  the session is busy, however many (a peer that sends and never reads made
  one process take 1.4 GB in 15 s). Here the session reads the next frame
  only once it has handled the last, so a fast sender is slowed by TCP, and a
  frame is refused while it arrives, as soon as it passes its size limit.
- Writing: every frame to the node goes into a bounded buffer that one writer
  greenlet flushes, with a deadline. ``send`` never blocks, so no loop shared
  by many sessions (the hub's ticker, the wake listener, shutdown) ever waits
  on one peer; a peer that does not read is cut off, never waited for.
- One greenlet per idle session: the writer exists only while there is
  something to write.

Permessage-deflate is never negotiated (web/admission.py drops the offer).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.utilities import ProtocolError as WsProtocolError

from dispatcher.vocabulary import CloseCode

#: Bytes read from the socket at a time.
RECV_BYTES = 64 * 1024
#: Seconds a closing session waits for the peer's close frame before the socket is cut.
CLOSE_GRACE_S = 5.0


class FrameTooLarge(Exception):
    """Raised by ``receive`` when a frame passes ``max_frame_bytes`` while it arrives."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of more than {limit} bytes (at least {size})")
        self.limit = limit


class _SendTimedOut(Exception):
    """Raised in the writer when the peer has not taken a flush within the send deadline."""


class NoReaderThread:
    """simple-websocket's ``thread_class``: the session reads the socket itself."""

    def __init__(self, target: Any) -> None:
        self.name = "unused"

    def start(self) -> None:
        pass


def server_options() -> dict[str, Any]:
    """flask-sock's SOCK_SERVER_OPTIONS: the handshake only (limits and pings are ours)."""
    return {"thread_class": NoReaderThread, "ping_interval": None, "max_message_size": None}


class Transport:
    """Frames in and out of one WebSocket, bounded. Only its session calls
    ``receive``; ``send``, ``close`` and ``abort`` may come from any greenlet
    and return at once."""

    __slots__ = ("_ws", "_sock", "_conn", "_events", "_partial", "_partial_chars", "_out", "_out_bytes",
                 "_writer", "_refill", "_refill_wanted", "closing_since_s", "closed", "last_received_s",
                 "ping_sent", "max_frame_bytes", "max_buffered_bytes", "send_timeout_s", "close_code")

    def __init__(self, ws: Any, max_frame_bytes: int, max_buffered_bytes: int, send_timeout_s: float) -> None:
        self._ws = ws
        self._sock: socket.socket = ws.sock
        conn = ws.ws
        if conn.connection is not None:
            # Past the handshake only wsproto's frame-level connection is used: the handshake's
            # HTTP state (h11's connection, the request and its headers: about 50 objects and
            # several KiB a session) is dropped with it.
            conn, ws.ws = conn.connection, None
        self._conn = conn
        self._events: Any = iter(())
        #: The pieces of a frame in arrival: all str (a text frame) or all bytes (a binary one).
        self._partial: list[str | bytes | bytearray] = []
        self._partial_chars = 0
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        self._writer: gevent.Greenlet | None = None
        #: Called by the writer when its buffer is empty and a refill was asked for.
        self._refill: Callable[[], None] | None = None
        self._refill_wanted = False
        #: When close() was called (monotonic s), None while open.
        self.closing_since_s: float | None = None
        #: The socket is done with: nothing more is read or written.
        self.closed = False
        self.last_received_s = time.monotonic()
        self.ping_sent = False
        self.max_frame_bytes = max_frame_bytes
        self.max_buffered_bytes = max_buffered_bytes
        self.send_timeout_s = send_timeout_s
        #: The close code sent or received, once closing.
        self.close_code: int | None = None

    # --- reading (the session's own greenlet) -------------------------------

    def receive(self) -> str | bytes | None:
        """The next whole frame, or None once the connection is over. Raises
        FrameTooLarge (the rest of that frame is then never read)."""
        while True:
            for event in self._events:
                frame = self._on_event(event)
                if frame is not None:
                    return frame
                if self.closed:
                    return None
            if self.closed:
                return None
            try:
                data = self._sock.recv(RECV_BYTES)
            except OSError:
                data = b""
            if not data:
                self._finish()
                return None
            self.last_received_s = time.monotonic()
            self.ping_sent = False
            try:
                self._conn.receive_data(data)
            except WsProtocolError:
                self._finish()
                return None
            self._events = self._conn.events()

    def _on_event(self, event: Any) -> str | bytes | None:
        if isinstance(event, (TextMessage, BytesMessage)):
            if self._partial_chars < 0:  # the rest of a frame refused as too large
                if event.message_finished:
                    self._partial_chars = 0
                return None
            self._partial.append(event.data)
            self._partial_chars += len(event.data)
            # Characters count at most the bytes they encode: exact once the frame is whole.
            if self._partial_chars > self.max_frame_bytes:
                size = self._partial_chars
                self._partial, self._partial_chars = [], 0 if event.message_finished else -1
                raise FrameTooLarge(size, self.max_frame_bytes)
            if not event.message_finished:
                return None
            parts, self._partial, self._partial_chars = self._partial, [], 0
            frame: str | bytes
            if len(parts) == 1:
                frame = parts[0] if not isinstance(parts[0], bytearray) else bytes(parts[0])
            elif isinstance(parts[0], str):
                frame = "".join(part for part in parts if isinstance(part, str))
            else:
                frame = b"".join(part for part in parts if not isinstance(part, str))
            if isinstance(frame, str) and 4 * len(frame) > self.max_frame_bytes:
                size = len(frame.encode())
                if size > self.max_frame_bytes:
                    raise FrameTooLarge(size, self.max_frame_bytes)
            return frame
        if isinstance(event, Ping):
            self._queue_event(event.response(), bounded=False)
        elif isinstance(event, Pong):
            self.ping_sent = False
        elif isinstance(event, CloseConnection):
            # The peer's close (answered), or a protocol error wsproto turned into one (sent).
            if self.close_code is None:
                self.close_code = event.code
            if self._conn.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                reply = event.response() if self._conn.state == ConnectionState.REMOTE_CLOSING else event
                self._queue_event(reply, bounded=False)
                self.closing_since_s = self.closing_since_s or time.monotonic()
                self._start_writer()
            else:
                self._finish()
        return None

    # --- writing (any greenlet; never blocks) ---------------------------------

    def send(self, text: str) -> bool:
        """Queue one text frame. False when closing, or when the buffer is full (the
        peer does not read: the connection is then cut)."""
        if self.closing_since_s is not None:
            return False
        return self._queue_event(TextMessage(data=text), bounded=True)

    def buffered_bytes(self) -> int:
        return self._out_bytes

    def want_refill(self, refill: Callable[[], None]) -> None:
        """Have the writer call ``refill`` (which may block: it runs on the writer)
        once what is buffered has gone out."""
        self._refill, self._refill_wanted = refill, True
        self._start_writer()

    def ping(self) -> None:
        if self.closing_since_s is None:
            self.ping_sent = True
            self._queue_event(Ping(), bounded=False)

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame after what is queued, then end the connection."""
        if self.closing_since_s is not None or self.closed:
            return
        self.closing_since_s = time.monotonic()
        self.close_code = code
        self._queue_event(CloseConnection(code=code, reason=reason[:120]), bounded=False)
        self._start_writer()

    def abort(self) -> None:
        """Cut the connection now: the receive and any blocked send return at once."""
        self._finish()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def overdue(self, now_s: float) -> bool:
        """Closing for longer than the grace: the peer never answered our close."""
        return self.closing_since_s is not None and not self.closed and now_s - self.closing_since_s > CLOSE_GRACE_S

    # --- the writer -----------------------------------------------------------

    def _queue_event(self, event: Any, bounded: bool) -> bool:
        # wsproto refuses to frame anything but a close reply once a close went either way.
        if self.closed or self._conn.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return False
        if self._conn.state == ConnectionState.REMOTE_CLOSING and not isinstance(event, CloseConnection):
            return False
        return self._queue(self._conn.send(event), bounded)

    def _queue(self, data: bytes, bounded: bool) -> bool:
        if bounded and self._out_bytes + len(data) > self.max_buffered_bytes:
            self.close_code = CloseCode.POLICY
            self.abort()
            return False
        self._out.append(data)
        self._out_bytes += len(data)
        self._start_writer()
        return True

    def _start_writer(self) -> None:
        if self._writer is None and not self.closed:
            self._writer = gevent.spawn(self._write)

    def _write(self) -> None:
        try:
            while not self.closed:
                if not self._out and self._refill_wanted and self.closing_since_s is None:
                    self._refill_wanted = False
                    assert self._refill is not None
                    self._refill()
                    continue
                if not self._out:
                    break
                chunk = b"".join(self._out) if len(self._out) > 1 else self._out[0]
                self._out.clear()
                with gevent.Timeout(self.send_timeout_s, _SendTimedOut):
                    self._sock.sendall(chunk)
                self._out_bytes -= len(chunk)
            if self.closing_since_s is not None and not self.closed and not self._out:
                # Our close frame (or our reply to theirs) is out: no more writes. The
                # receive loop ends when the peer closes too (or ``overdue`` cuts it).
                self._sock.shutdown(socket.SHUT_WR)
        except (_SendTimedOut, OSError):
            self.close_code = self.close_code or CloseCode.POLICY
            self.abort()
        finally:
            self._writer = None

    def _finish(self) -> None:
        if not self.closed:
            self.closed = True
            self._out.clear()
            self._out_bytes = 0
            self._ws.connected = False  # flask-sock's own close() after the route then does nothing
            # Two reference cycles, so that the session is freed by reference counting once it
            # ends, even when web/gcpolicy.py froze it: the refill (the session's bound method)
            # and the generator wsproto's frame parser holds on itself.
            self._refill = None
            parser = getattr(getattr(self._conn, "_proto", None), "_parse_more", None)
            if parser is not None and hasattr(parser, "close"):
                parser.close()
