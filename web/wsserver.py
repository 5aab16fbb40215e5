"""simple-websocket, told to say why before it closes an oversized frame.

simple-websocket enforces ``max_message_size`` while the frame is still
arriving (so an oversized frame is never buffered whole) but closes with 1009
without a word. flask-sock builds the server itself and lets us choose only its
options; ``thread_class`` is one of them, and its constructor receives the
server, which is where we wrap the protocol object so the ``error`` frame the
contract asks for goes out just before the close frame.
"""

from __future__ import annotations

import threading
from typing import Any

from wsproto.events import CloseConnection, TextMessage
from wsproto.frame_protocol import CloseReason

from dispatcher.messages import ErrorMessage


#: The reason simple-websocket gives when it refuses a frame (our own 1009 closes say more).
_ITS_REASON = "Message is too big"


class _ErrorBeforeTooBig:
    def __init__(self, connection: Any, limit_bytes: int) -> None:
        self._connection = connection
        self._error = ErrorMessage(
            code="MESSAGE_TOO_LARGE", message=f"frame exceeds max_message_bytes {limit_bytes}"
        ).encode()

    def send(self, event: Any) -> bytes:
        if (isinstance(event, CloseConnection) and event.code == CloseReason.MESSAGE_TOO_BIG
                and event.reason == _ITS_REASON):
            return self._connection.send(TextMessage(data=self._error)) + self._connection.send(event)
        return self._connection.send(event)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


class ReaderThread(threading.Thread):
    """The reader thread simple-websocket starts per connection (a greenlet under gevent)."""

    def __init__(self, target: Any) -> None:
        server = target.__self__
        if server.max_message_size:
            server.ws = _ErrorBeforeTooBig(server.ws, server.max_message_size)
        super().__init__(target=target, daemon=True)


def server_options(max_message_bytes: int, ping_interval_s: float | None) -> dict[str, Any]:
    """flask-sock's SOCK_SERVER_OPTIONS."""
    return {
        "max_message_size": max_message_bytes,
        "ping_interval": ping_interval_s,
        "thread_class": ReaderThread,
    }
