"""Node sessions over real WebSockets: a node driven frame by frame (``NodeClient``), one
that heartbeats on its own (``LiveNode``), and a peer speaking WebSocket by hand that can
misbehave (``RawSocket``)."""

from __future__ import annotations

import base64
import json
import os
import queue
import socket
import struct
import threading
import time
from typing import Any, ClassVar

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

#: A frame type no server knows: its answer (an INVALID_MESSAGE error) marks a point in the
#: stream of answers (``LiveNode.sync``).
SYNC_TYPE = "test_sync_marker"


class NodeClient:
    """A node's WebSocket session, driven frame by frame."""

    def __init__(self, ws_url: str) -> None:
        # max_queue=None: a test that stops reading must still see the server's close frame.
        self.ws: ClientConnection = connect(ws_url, max_size=None, max_queue=None, open_timeout=5, legacy=True)
        self.node_id: str | None = None
        self.secret: str | None = None
        self.seen: list[dict[str, Any]] = []
        #: Every frame received, as the text the server sent.
        self.raw: list[str] = []

    def send(self, frame: dict[str, Any] | str) -> None:
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def recv(self, timeout_s: float = 5) -> dict[str, Any]:
        text = self.ws.recv(timeout=timeout_s)
        self.raw.append(text)
        frame = json.loads(text)
        self.seen.append(frame)
        return frame

    def expect(self, kind: str, timeout_s: float = 5, **fields: Any) -> dict[str, Any]:
        """The next frame of this type (and these field values), skipping others."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {kind} {fields} within {timeout_s} s; saw {self.seen[-10:]}")
            try:
                frame = self.recv(remaining)
            except TimeoutError:
                continue
            if frame.get("type") == kind and all(frame.get(k) == v for k, v in fields.items()):
                return frame

    def register(self, **fields: Any) -> dict[str, Any]:
        self.send({"type": "node_register", **fields})
        ack = self.expect("node_register_ack")
        self.node_id, self.secret = ack["node_id"], ack["node_secret"]
        return ack

    def heartbeat(self, models: dict[str, str] | None = None, cpu_percent: float = 5.0, **fields: Any) -> None:
        frame: dict[str, Any] = {"type": "node_heartbeat", "node_id": self.node_id,
                                 "timestamp": int(time.time() * 1000),
                                 "resource_usage": {"cpu_percent": cpu_percent, "gpu_percent": 1.0, "mem_percent": 10.0,
                                                    "running_jobs": 0}}
        if models is not None:
            frame["installed_models"] = [{"model_id": m, "status": s} for m, s in models.items()]
        frame.update(fields)
        self.send(frame)

    def sync(self, timeout_s: float = 5) -> list[dict[str, Any]]:
        """A WebSocket ping, once its pong is back: the server handles a session's frames one at
        a time, in order, and answers a ping after every frame sent before it, so every answer to
        those frames has arrived. Returns the frames that came meanwhile (also in ``seen``)."""
        if not self.ws.ping().wait(timeout_s):
            raise AssertionError(f"no pong within {timeout_s} s")
        came = []
        while True:
            try:
                came.append(self.recv(0))
            except TimeoutError:
                return came

    def closed_with(self, timeout_s: float = 5) -> int | None:
        """Read until the server closes; the close code."""
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                try:
                    self.recv(deadline - time.monotonic())
                except TimeoutError:
                    break
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
        raise AssertionError(f"session still open after {timeout_s} s")

    def close(self) -> None:
        self.ws.close()


class LiveNode:
    """A node session that heartbeats on its own and collects what the server sends."""

    def __init__(self, ws_url: str, models: dict[str, str] | None = None, heartbeat_s: float = 0.3,
                 **register_fields: Any) -> None:
        self.client = NodeClient(ws_url)
        self.models = dict(models or {})
        self.usage = {"cpu_percent": 5.0, "gpu_percent": 1.0, "mem_percent": 10.0, "running_jobs": 0}
        self.frames: queue.Queue[dict[str, Any]] = queue.Queue()
        self.all_frames: list[dict[str, Any]] = []
        self.closed = threading.Event()
        self.ack = self.client.register(
            installed_models=[{"model_id": m, "status": s} for m, s in self.models.items()], **register_fields)
        self.node_id: str = self.ack["node_id"]
        self.secret: str = self.ack["node_secret"]
        self._beating = threading.Event()
        self._beating.set()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                text = self.client.ws.recv()
                self.client.raw.append(text)
                frame = json.loads(text)
                self.all_frames.append(frame)
                self.frames.put(frame)
        except Exception:  # noqa: BLE001 - closed, one way or another
            self.closed.set()

    def _beat(self, interval_s: float) -> None:
        while not self.closed.is_set():
            if self._beating.is_set():
                try:
                    self.send({"type": "node_heartbeat", "node_id": self.node_id, "resource_usage": self.usage,
                               "installed_models": [{"model_id": m, "status": s} for m, s in self.models.items()]})
                except Exception:  # noqa: BLE001
                    return
            time.sleep(interval_s)

    def silence(self) -> None:
        """Stop heartbeating (the session stays open)."""
        self._beating.clear()

    def send(self, frame: dict[str, Any]) -> None:
        self.client.send(frame)

    def expect(self, kind: str, timeout_s: float = 10, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.node_id}: no {kind} {fields} within {timeout_s} s; "
                                     f"saw {[f.get('type') for f in self.all_frames[-15:]]}")
            try:
                frame = self.frames.get(timeout=remaining)
            except queue.Empty:
                continue
            if frame.get("type") == kind and all(frame.get(k) == v for k, v in fields.items()):
                return frame

    def sync(self, timeout_s: float = 10) -> None:
        """Send a frame the server answers with an error (an unknown type) and wait for that
        answer: the session handles frames in order, so every answer to the frames sent before
        has arrived by then (frames the server sends of its own accord are not answers)."""
        self.send({"type": SYNC_TYPE})
        deadline = time.monotonic() + timeout_s
        while SYNC_TYPE not in self.expect("error", deadline - time.monotonic()).get("message", ""):
            pass

    def errors(self) -> list[dict[str, Any]]:
        """The error frames received, but for the answers to ``sync``."""
        return [f for f in self.all_frames if f.get("type") == "error" and SYNC_TYPE not in f.get("message", "")]

    def wait_ready(self, timeout_s: float = 10) -> LiveNode:
        self.expect("node_status", timeout_s, status="ready")
        return self

    def take_job(self, timeout_s: float = 10, **fields: Any) -> dict[str, Any]:
        """The next job_assign, acknowledged."""
        job = self.expect("job_assign", timeout_s, **fields)
        self.send({"type": "job_ack", "job_id": job["job_id"], "attempt": job["attempt"]})
        return job

    def succeed(self, job: dict[str, Any], output: Any) -> None:
        self.send({"type": "job_result", "job_id": job["job_id"], "attempt": job["attempt"], "success": True,
                   "output": output, "duration_ms": 5})

    def fail(self, job: dict[str, Any], code: str, message: str, retryable: bool) -> None:
        self.send({"type": "job_result", "job_id": job["job_id"], "attempt": job["attempt"], "success": False,
                   "error": {"code": code, "message": message, "retryable": retryable}})

    def assigned(self) -> list[dict[str, Any]]:
        return [f for f in self.all_frames if f.get("type") == "job_assign"]

    def close(self) -> None:
        self.closed.set()
        self.client.close()


class RawSocket:
    """A WebSocket spoken by hand over a plain socket: a peer that can misbehave
    (never read, pick its source address, send any Origin). Every one opened during a
    test is closed after it (``close_all``), so a test may just drop the ones it holds."""

    opened: ClassVar[list[RawSocket]] = []

    def __init__(self, port: int, source: str = "127.0.0.1", origin: str | None = None,
                 receive_buffer: int | None = None, path: str = "/ws/node") -> None:
        self.sock = socket.socket()
        RawSocket.opened.append(self)
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.bind((source, 0))
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        if origin is not None:
            lines.append(f"Origin: {origin}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            head += chunk
        self.status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
        self.buffer = head.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in head else b""

    @staticmethod
    def frame(text: str | bytes, opcode: int = 0x1) -> bytes:
        """One masked client frame."""
        payload = text.encode() if isinstance(text, str) else text
        header = bytes([0x80 | opcode])
        size = len(payload)
        if size < 126:
            header += bytes([0x80 | size])
        elif size < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", size)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", size)
        mask = os.urandom(4)
        return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def send(self, frame: dict[str, Any] | str) -> None:
        self.sock.sendall(self.frame(frame if isinstance(frame, str) else json.dumps(frame)))

    def recv(self, timeout_s: float = 5) -> tuple[int, bytes] | None:
        """The next server frame as (opcode, payload), or None once the server closed the TCP stream."""
        self.sock.settimeout(timeout_s)

        def need(n: int) -> bool:
            while len(self.buffer) < n:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return False
                self.buffer += chunk
            return True
        if not need(2):
            return None
        opcode, size = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
        offset = 2
        if size == 126:
            if not need(4):
                return None
            size, offset = struct.unpack("!H", self.buffer[2:4])[0], 4
        elif size == 127:
            if not need(10):
                return None
            size, offset = struct.unpack("!Q", self.buffer[2:10])[0], 10
        if not need(offset + size):
            return None
        payload, self.buffer = self.buffer[offset:offset + size], self.buffer[offset + size:]
        return opcode, payload

    def recv_json(self, timeout_s: float = 5) -> dict[str, Any]:
        while True:
            got = self.recv(timeout_s)
            assert got is not None, "closed"
            if got[0] == 0x1:
                return json.loads(got[1])
            assert got[0] != 0x8, f"closed with {got[1][:2].hex()} {got[1][2:]!r}"

    def close_code(self, timeout_s: float = 5) -> int | None:
        """Read until the server's close frame: its code (None if the stream ended without one)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.recv(max(0.1, deadline - time.monotonic()))
            if got is None:
                return None
            if got[0] == 0x8:
                return struct.unpack("!H", got[1][:2])[0] if len(got[1]) >= 2 else 1005
        raise AssertionError(f"no close within {timeout_s} s")

    def close(self) -> None:
        self.sock.close()

    @classmethod
    def close_all(cls) -> None:
        while cls.opened:
            cls.opened.pop().close()


def integral_floats(text: str) -> list[str]:
    """The numbers of a frame's JSON text written as floats though integral (``15.0``, ``3e2``):
    the protocol sends those as integers."""
    found: list[str] = []
    json.loads(text, parse_float=lambda number: found.append(number) if float(number).is_integer() else None)
    return found




def ready_node(nodes: Any, web: Any, **fields: Any) -> NodeClient:
    """A node session (from the ``nodes`` fixture) registered and made ready by three healthy
    heartbeats; its ready node_status read."""
    node = nodes(web)
    node.register(**fields)
    for _ in range(3):
        node.heartbeat({"whisper": "ready"})
    node.expect("node_status", status="ready")
    return node
