"""A light WebSocket client for benchmarks: thousands of sessions in one asyncio loop.

The websockets library costs a task, buffers and tens of KiB per connection;
at 10,000 sessions on a 2-core machine the client, not the server, became the
bottleneck. This speaks only what a benchmark needs: the opening handshake,
text frames both ways, ping -> pong and the close handshake. Frames to the
server are masked with a zero key (valid framing; nothing here is secret).
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
from collections.abc import Callable
from typing import cast

_PONG = 0xA
_HEADER_END = b"\r\n\r\n"


class Refused(Exception):
    """Raised by ``open_session`` when the server answers the handshake with anything but 101."""


class Session(asyncio.Protocol):
    """One WebSocket. ``on_text(payload)`` runs for each text frame from the server."""

    __slots__ = ("_buf", "_request", "closed", "on_text", "opened", "transport")

    def __init__(self, request: bytes, on_text: Callable[[bytes], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_text = on_text
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._buf = bytearray()
        self._request = request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # create_connection makes a stream transport
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self.opened.done():
            end = self._buf.find(_HEADER_END)
            if end < 0:
                return
            status = bytes(self._buf[:end]).split(b"\r\n", 1)[0]
            del self._buf[:end + 4]
            if b" 101 " not in status + b" ":
                self.opened.set_exception(Refused(status.decode(errors="replace")))
                self.transport.close()  # type: ignore[union-attr]
                return
            self.opened.set_result(None)
        self._frames()

    def _frames(self) -> None:
        buf = self._buf
        while len(buf) >= 2:
            opcode, length, at = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, at = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + length:
                return
            payload = bytes(buf[at:at + length])
            del buf[:at + length]
            if opcode == 0x1:  # the server never fragments what it sends here
                self.on_text(payload)
            elif opcode == 0x9:
                self._send(_PONG, payload)
            elif opcode == 0x8:
                self._send(0x8, payload[:2])
                self.transport.close()  # type: ignore[union-attr]
                return

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        self.transport.write(head + b"\0\0\0\0" + payload)

    def send_text(self, payload: bytes) -> None:
        self._send(0x1, payload)

    def close(self) -> None:
        self._send(0x8, (1000).to_bytes(2, "big"))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before the handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)


async def open_session(host: str, port: int, path: str, on_text: Callable[[bytes], None],
                       source: str | None = None, timeout_s: float = 60) -> Session:
    """Connect and finish the handshake; raises Refused, OSError or TimeoutError."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    local = (source, 0) if source else None
    _, session = await asyncio.wait_for(
        loop.create_connection(lambda: Session(request, on_text), host, port, local_addr=local), timeout_s)
    try:
        await asyncio.wait_for(asyncio.shield(session.opened), timeout_s)
    except BaseException:
        session.abort()
        raise
    return session


def backoff_s(failures: int, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """The reference agent's reconnect delay: full jitter, doubling per failure."""
    return random.uniform(0, min(cap_s, base_s * 2 ** failures))
