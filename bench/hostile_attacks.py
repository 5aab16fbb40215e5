"""The attacker side of bench/hostile.py: this script with ``--attack KIND``, a child process
in a process group of its own, from source addresses other than the honest side's.

Each attack runs until SIGTERM and prints its counters as one JSON line a
second; the bench reads the last.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from common import chunks, raise_open_files_limit
from hostile_honest import register_frame

#: Attackers spread over these source addresses; honest traffic uses 127.0.0.1.
ATTACKER_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 251)]


class Tally:
    """An attacker's counters, shared by its threads."""

    def __init__(self) -> None:
        self._counts: dict[str, Any] = {}
        self._lock = threading.Lock()
        #: What the final report needs but the status lines do not print.
        self.kept: dict[str, Any] = {}

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def set(self, key: str, value: Any) -> None:
        with self._lock:
            self._counts[key] = value

    def get(self, key: str) -> Any:
        with self._lock:
            return self._counts.get(key, 0)

    def print_line(self, **extra: Any) -> None:
        with self._lock:
            line = json.dumps({**self._counts, **extra}, sort_keys=True)
        print(line, flush=True)


def host_port(ws_url: str) -> tuple[str, int]:
    host_and_port = ws_url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_and_port.rsplit(":", 1)
    return host, int(port)


def text_frame(payload: bytes) -> bytes:
    """A client text frame, masked with a zero key: the payload goes out as it is, built once."""
    n = len(payload)
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 65536:
        length = bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        length = bytes([0x80 | 127]) + struct.pack("!Q", n)
    return b"\x81" + length + b"\x00\x00\x00\x00" + payload


def raw_websocket(host: str, port: int, source: str, rcvbuf_bytes: int) -> socket.socket:
    """A WebSocket opened by hand on a plain socket (the handshake is the only thing it ever reads)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive buffer: the server's replies fill it at once and it never drains.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws/node HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    status_line = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status_line:
        raise ConnectionError(f"handshake refused: {status_line[:80]!r}")
    sock.settimeout(None)
    return sock


def attack_unread(opts: argparse.Namespace, tally: Tally, stop: threading.Event) -> None:
    """N clients write junk frames as fast as they can and never read a byte."""
    host, port = host_port(opts.ws_url)
    # Junk with a "type": the server names the unknown type in its error frame (ref_type),
    # so each frame is answered with about as many bytes, which nobody reads: the
    # server's send buffer is full after a few dozen frames and stays full.
    frame = text_frame(json.dumps({"type": "x" * (opts.frame_kib * 1024 - 12)}).encode())
    open_socks: set[socket.socket] = set()
    lock = threading.Lock()

    def client(i: int) -> None:
        source = ATTACKER_ADDRESSES[i % len(ATTACKER_ADDRESSES)]
        while not stop.is_set():
            sock = None
            try:
                sock = raw_websocket(host, port, source, 4096)
                tally.add("connects")
                with lock:
                    open_socks.add(sock)
                while not stop.is_set():
                    sock.sendall(frame)
                    tally.add("frames_sent")
            except OSError as exc:
                if not stop.is_set():
                    tally.add("closed_by_server" if sock is not None else "connect_failures")
                    tally.set("last_error", type(exc).__name__)
                    time.sleep(0.2)
            finally:
                if sock is not None:
                    with lock:
                        open_socks.discard(sock)
                    sock.close()

    for i in range(opts.count):
        threading.Thread(target=client, args=(i,), daemon=True).start()
    stop.wait()
    with lock:
        for sock in open_socks:  # wakes a sendall blocked on a full buffer
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def idle_options() -> dict[str, Any]:
    # No compression (a zlib context per session adds up) and a tiny queue: nothing is kept unread.
    return {"compression": None, "ping_interval": None, "open_timeout": 10, "close_timeout": 1, "proxy": None,
            "max_queue": 4, "max_size": 65536}


async def hold_idle_sessions(opts: argparse.Namespace, tally: Tally) -> None:
    """N sessions connect and do nothing; the library answers the server's pings."""
    gate = asyncio.Semaphore(200)  # opening concurrency: a burst, not a SYN flood
    open_now = 0

    async def hold(i: int) -> None:
        nonlocal open_now
        source = ATTACKER_ADDRESSES[i % len(ATTACKER_ADDRESSES)]
        while True:
            try:
                async with gate:
                    ws = await connect(opts.ws_url, local_addr=(source, 0), **idle_options())
            except (OSError, TimeoutError, WebSocketException) as exc:
                tally.add("connect_failures")
                tally.set("last_error", type(exc).__name__)
                await asyncio.sleep(1 + random.random())
                continue
            open_now += 1
            tally.set("open", open_now)
            tally.set("peak_open", max(open_now, tally.get("peak_open")))
            await ws.wait_closed()
            open_now -= 1
            tally.set("open", open_now)
            tally.add("closed_by_server")
            await asyncio.sleep(1 + random.random())

    await asyncio.gather(*(hold(i) for i in range(opts.count)))


async def flood_session(opts: argparse.Namespace, tally: Tally) -> None:
    """One session sends ``rate`` frames a second, never registering; it reads every reply."""
    heartbeat = json.dumps({"type": "node_heartbeat", "resource_usage": {"cpu_percent": 1, "mem_percent": 1}})
    junk = "junk " * 20
    per_tick = max(1, opts.rate // 100)  # paced in 10 ms ticks

    async def read(ws: Any) -> None:
        async for raw in ws:
            try:
                tally.add(f"reply_{json.loads(raw).get('code') or json.loads(raw).get('type')}")
            except (ValueError, AttributeError):
                tally.add("reply_unparsed")

    while True:
        try:
            async with connect(opts.ws_url, local_addr=(ATTACKER_ADDRESSES[0], 0), **idle_options()) as ws:
                tally.add("connects")
                reader = asyncio.create_task(read(ws))  # held: the loop keeps only a weak reference
                next_tick = time.monotonic()
                try:
                    while True:
                        for k in range(per_tick):
                            await ws.send(heartbeat if k % 2 else junk)
                        tally.add("frames_sent", per_tick)
                        next_tick += 0.01
                        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
                finally:
                    reader.cancel()
        except ConnectionClosed as exc:
            tally.add("closed_by_server")
            tally.set("last_close_code", exc.rcvd.code if exc.rcvd else None)
        except (OSError, TimeoutError, WebSocketException) as exc:
            tally.add("connect_failures")
            tally.set("last_error", type(exc).__name__)
        await asyncio.sleep(0.5)


def big_features(size_bytes: int) -> dict[str, Any]:
    """An advanced_features dict whose JSON is about ``size_bytes``."""
    value = "f" * 100
    return {f"feature_{k:05d}": value for k in range(size_bytes // 120)}


def largest_record(i: int) -> dict[str, Any]:
    """What a node_register may carry at every bound (docs/protocol.md, section 1): about
    70 KB of record. One in ten asks for 16-128 KiB of advanced_features, past the bound."""
    features = big_features(random.randint(16, 128) * 1024) if i % 10 == 0 else big_features(7900)
    return {
        "advanced_features": features,
        "installed_models": [{"model_id": f"m{i:06d}-{k:03d}-".ljust(128, "x"), "status": "ready"}
                             for k in range(256)],
        "labels": {f"label-{k:02d}".ljust(63, "k"): "v" * 63 for k in range(64)},
        "hardware": {"cpu_cores": 64, "memory_gb": 512, "gpus": [{"name": "g" * 200, "memory_gb": 80}] * 64},
        "max_concurrent_jobs": 1024,
    }


async def register_big_nodes(opts: argparse.Namespace, tally: Tally) -> None:
    """With a valid token: N nodes register with the largest record allowed (one in ten
    with more, which is refused), then close: N records left for /api/nodes to page."""
    gate = asyncio.Semaphore(20)
    latencies_ms: list[float] = []

    async def one(i: int) -> None:
        frame = register_frame(opts.token, version="hostile-big", **largest_record(i))
        async with gate:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(30):
                    async with connect(opts.ws_url, local_addr=(ATTACKER_ADDRESSES[i % len(ATTACKER_ADDRESSES)], 0),
                                       **idle_options()) as ws:
                        await ws.send(frame)
                        tally.add("bytes_sent", len(frame))
                        async for raw in ws:
                            reply = json.loads(raw)
                            if reply.get("type") == "node_register_ack":
                                latencies_ms.append((time.perf_counter() - started) * 1000)
                                tally.add("registered")
                                break
                            if reply.get("type") == "error":  # refused (too large, say): next node
                                tally.add(f"refused_{reply.get('code')}")
                                break
            except (OSError, TimeoutError, WebSocketException) as exc:
                tally.add("failures")
                tally.set("last_error", type(exc).__name__)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(opts.count)))
    tally.set("all_done_s", round(time.perf_counter() - started, 1))
    if latencies_ms:
        tally.set("register_p50_ms", round(statistics.median(latencies_ms), 1))
        tally.set("register_max_ms", round(max(latencies_ms), 1))
    await asyncio.Event().wait()  # the nodes are closed; nothing more to do until told to stop


def submit_unplaceable(opts: argparse.Namespace, tally: Tally, stop: threading.Event) -> None:
    """N jobs at once that no node can take; they expire after the dispatch timeout."""
    # No result backend: the attacker never waits for (nor subscribes to) its results.
    app = Celery(broker=opts.redis_url, set_as_current=False)
    started = time.perf_counter()
    ids = tally.kept["job_ids"] = []
    for n in range(opts.count):
        if stop.is_set():
            break
        ids.append(app.send_task("dispatcher.submit_job", kwargs={
            "job_type": "echo", "payload": {"flood": n}, "required_models": ["no-such-model"],
            "timeout_seconds": 30, "dispatch_timeout_seconds": opts.dispatch_timeout}).id)
        tally.add("submitted")
    tally.set("submit_seconds", round(time.perf_counter() - started, 1))
    stop.wait()


def count_job_states(opts: argparse.Namespace, tally: Tally) -> None:
    """At the end: how many of the submitted jobs have a final state in Celery's backend."""
    ids = tally.kept.get("job_ids", [])
    client = redis.Redis.from_url(opts.redis_url, socket_timeout=10)
    states: Counter[str] = Counter()
    for chunk in chunks(ids, 1000):
        keys = [f"celery-task-meta-{i}" for i in chunk]
        for raw in client.mget(keys):
            states[json.loads(raw)["status"] if raw else "no result yet"] += 1
    tally.set("states_at_end", dict(states))


def run_async(coro_fn: Callable[[argparse.Namespace, Tally], Any]) -> Callable[..., None]:
    def run(opts: argparse.Namespace, tally: Tally, stop: threading.Event) -> None:
        asyncio.run(coro_fn(opts, tally))
    return run


ATTACKS: dict[str, tuple[Callable[..., None], Callable[..., None] | None]] = {
    "unread": (attack_unread, None),
    "idle": (run_async(hold_idle_sessions), None),
    "flood": (run_async(flood_session), None),
    "submit": (submit_unplaceable, count_job_states),
    "bignodes": (run_async(register_big_nodes), None),
}


def run_attacker(opts: argparse.Namespace) -> None:
    """Attack until SIGTERM, print the final counters, and exit at once (the kernel closes every socket)."""
    raise_open_files_limit()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    tally = Tally()
    attack, finish = ATTACKS[opts.attack]
    started = time.monotonic()

    def guarded() -> None:
        try:
            attack(opts, tally, stop)
        except Exception as exc:  # noqa: BLE001 - reported in the status line, then the attacker ends
            tally.set("crashed", f"{type(exc).__name__}: {exc}"[:200])
            stop.set()

    threading.Thread(target=guarded, name="attack", daemon=True).start()
    while not stop.wait(1.0):
        tally.print_line(elapsed_s=round(time.monotonic() - started))
    if finish is not None:
        try:
            finish(opts, tally)
        except Exception as exc:  # noqa: BLE001
            tally.set("finish_failed", f"{type(exc).__name__}: {exc}"[:200])
    tally.print_line(elapsed_s=round(time.monotonic() - started), final=True)
    sys.stdout.flush()
    os._exit(0)


