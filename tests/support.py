"""Real processes and real sessions for the tests: web servers, Celery, node clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from dispatcher.keys import STATUSES, Keys
from dispatcher.localrun.redis_server import free_port

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def clean_env(redis_url: str, **overrides: Any) -> dict[str, str]:
    """The parent's environment without any DISPATCHER_* setting, plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_") and k not in ("REDIS_URL", "PORT")}
    env["REDIS_URL"] = redis_url
    env["PYTHONUNBUFFERED"] = "1"
    # The Procfile's commands (gunicorn, celery) live beside this interpreter.
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)  # fault hooks live in tests/faults
    for key, value in overrides.items():
        name = key if key.isupper() else f"DISPATCHER_{key.upper()}"
        env[name] = json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)
    return env


class Process:
    """A child process whose output goes to a log file, shown when a test fails."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, cwd: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout_s: float = 10) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait()
        self._log.close()

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        self.signal(signal.SIGKILL)
        self.popen.wait()
        self._log.close()


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10, interval_s: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def integral_floats(text: str) -> list[str]:
    """The numbers of a frame's JSON text written as floats though integral (``15.0``, ``3e2``):
    the protocol sends those as integers."""
    found: list[str] = []
    json.loads(text, parse_float=lambda number: found.append(number) if float(number).is_integer() else None)
    return found


def procfile_command(name: str) -> str:
    """The Procfile's command line for a process type, run through a shell as honcho does."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        kind, sep, command = line.partition(":")
        if sep and kind.strip() == name:
            return command.strip()
    raise KeyError(f"no {name!r} process in the Procfile")


def start_procfile(name: str, env: dict[str, str], log_dir: Path, celery_app: str | None = None) -> Process:
    """A Procfile process; ``celery_app`` swaps the app a celery command loads (for fault hooks)."""
    command = procfile_command(name)
    if celery_app is not None:
        command = command.replace("-A dispatcher.celery_app", f"-A {celery_app}")
    return Process(name, ["bash", "-c", f"exec {command}"], env, log_dir, cwd=log_dir)


class WebServer:
    """``gunicorn -c python:web.gunicorn_conf`` exactly as the Procfile runs it."""

    def __init__(self, redis_url: str, log_dir: Path, config: str = "python:web.gunicorn_conf",
                 **settings: Any) -> None:
        self.port = free_port()
        self.env = clean_env(redis_url, PORT=self.port, **settings)
        self.log_dir = log_dir
        self.config = config
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/node"

    def start(self, config: str | None = None) -> WebServer:
        """Start (or start again, on the same port); ``config`` replaces the gunicorn config."""
        self.config = config or self.config
        if self.process is not None:
            self.process.kill()  # reap a dead one (or stop a live one) before taking its port
        self.process = Process("web", [PYTHON, "-m", "gunicorn", "-c", self.config],
                               self.env, self.log_dir, cwd=self.log_dir)
        try:
            wait_for(self._healthy, 20, 0.05, what=f"web server on port {self.port}")
        except AssertionError:
            self.process.kill()
            raise
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if not self.process.alive():
            raise AssertionError(f"web server exited:\n{self.process.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        return self.request("GET", path, headers=headers)

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                raw = response.read()
                status = response.status
                ctype = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            raw, status, ctype = err.read(), err.code, err.headers.get("Content-Type", "")
        return status, (json.loads(raw) if "json" in ctype else raw.decode())

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()


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


def assert_consistent(client: redis.Redis, keys: Keys) -> None:
    """Every node is in exactly the status set its record names; the indexes agree."""
    nodes = set(client.zrange(keys.nodes(), 0, -1))
    in_sets = {status: client.smembers(keys.status_set(status)) for status in STATUSES}
    live = set(client.zrange(keys.liveness(), 0, -1))
    warming = set(client.zrange(keys.warmup(), 0, -1))
    offline = set(client.zrange(keys.offline_since(), 0, -1))
    for indexed in (*in_sets.values(), live, warming, offline):
        assert indexed <= nodes, f"indexed but not known: {indexed - nodes}"
    for node_id in nodes:
        status = client.hget(keys.node(node_id), "status")
        holders = [s for s, members in in_sets.items() if node_id in members]
        assert holders == [status], f"{node_id} is {status} but in sets {holders}"
        assert (node_id in live) == (status != "offline"), f"{node_id} ({status}) liveness index disagrees"
        assert (node_id in warming) == (status == "registering"), f"{node_id} ({status}) warmup index disagrees"
        assert (node_id in offline) == (status == "offline"), f"{node_id} ({status}) offline index disagrees"
    cordoned = client.smembers(keys.cordoned())
    assert cordoned <= nodes, f"cordoned but not known: {cordoned - nodes}"
    for node_id in cordoned:
        assert client.hget(keys.node(node_id), "cordoned") == "1", f"{node_id} in the cordoned set, not cordoned"
        assert client.zscore(keys.capacity_index(), node_id) is None, f"{node_id} cordoned and in the capacity index"


class LiveNode:
    """A node session that heartbeats on its own and collects what the server sends."""

    def __init__(self, ws_url: str, models: dict[str, str] | None = None, heartbeat_s: float = 0.3,
                 **register_fields: Any) -> None:
        import queue
        import threading

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
        import queue

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

    opened: list[RawSocket] = []

    def __init__(self, port: int, source: str = "127.0.0.1", origin: str | None = None,
                 receive_buffer: int | None = None, path: str = "/ws/node") -> None:
        import base64
        import socket

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
        import struct

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
        import struct

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
        import struct

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


def web_worker_rss(server: WebServer) -> int:
    """Resident bytes of the web server's worker processes (gunicorn's children)."""
    import psutil

    assert server.process is not None
    return sum(child.memory_info().rss for child in psutil.Process(server.process.popen.pid).children(recursive=True))


def job_attempts(client: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    """The job's ended attempts (node, assigned, acked, ended, outcome), oldest first."""
    return json.loads(client.hget(Keys().job(job_id), "attempts") or "[]")


def apply_result(jobs: Any, node_id: str, msg: Any, kind: str | None = None) -> str:
    """A node's result as a web process hands it on and a worker applies it: the outcome
    ("stale" when the web process already knew it for one)."""
    from dispatcher.completions import Completions

    if not jobs.report_result(node_id, msg, kind):
        return "stale"
    completions = Completions(jobs, "tests")
    outcomes = []
    for entry_id, fields in completions.read(None):
        outcomes.append(jobs.complete(fields)[0])
        jobs.client.xack(jobs.keys.results(), "completers", entry_id)
    assert len(outcomes) == 1, outcomes
    return str(outcomes[0])
