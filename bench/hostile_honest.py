"""The honest side of bench/hostile.py: one node, one client, and new nodes registering.

Their latencies and failures during an attack are what the bench judges.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from queue import Queue
from typing import Any

from celery import Celery
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from hostile_probes import Loop, Samples, now_s
from hostile_system import HONEST_TOKEN


def register_frame(token: str, node_id: str | None = None, secret: str | None = None, **extra: Any) -> str:
    frame: dict[str, Any] = {"type": "node_register", "registration_token": token, **extra}
    if node_id is not None:
        frame.update(node_id=node_id, node_secret=secret)
    return json.dumps(frame)


class HonestNode:
    """An in-process node with the token, on its own thread and event loop.

    It heartbeats every second, acks each job_assign at once and answers it
    ~10 ms later, and whenever its session ends it reconnects and resumes
    (node_id + node_secret), recording why the session ended.
    """

    def __init__(self, ws_url: str, heartbeat_s: float = 1.0, answer_s: float = 0.01, slots: int = 4) -> None:
        self.ws_url = ws_url
        self.heartbeat_s = heartbeat_s
        self.answer_s = answer_s
        self.slots = slots
        self.events = Samples()      # (kind, detail): close, connect_failed, registered, resumed, status, error
        self.loop_lag = Samples()    # ms the bench's own loop was late: tells bench noise from server stalls
        self.ready = threading.Event()
        self.status: str | None = None
        self.node_id: str | None = None
        self._secret: str | None = None
        self._answers: OrderedDict[tuple[str, int], str] = OrderedDict()  # a job sent again is answered again
        self._answering: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references to tasks
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ws: Any = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="honest node", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            if self._ws is not None:
                asyncio.run_coroutine_threadsafe(self._ws.close(), self._loop)
        self._thread.join(15)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        lag = asyncio.create_task(self._watch_lag())
        while not self._stop.is_set():
            await self._one_session()
            if not self._stop.is_set():
                await asyncio.sleep(0.2)  # reconnect at once, but never spin
        lag.cancel()

    async def _watch_lag(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.1)
            self.loop_lag.add((time.perf_counter() - started - 0.1) * 1000)

    async def _one_session(self) -> None:
        beater: asyncio.Task[None] | None = None
        try:
            async with connect(self.ws_url, compression=None, ping_interval=None, open_timeout=10,
                               close_timeout=2, proxy=None, max_size=None) as ws:
                self._ws = ws
                await ws.send(register_frame(HONEST_TOKEN, self.node_id, self._secret, max_concurrent_jobs=self.slots,
                                             version="hostile-bench"))
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame.get("type") == "node_register_ack":
                        beater = asyncio.create_task(self._beat(ws))
                    self._on_frame(ws, frame)
            code: Any = ws.close_code
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
        except (OSError, TimeoutError, WebSocketException) as exc:
            if self._ws is not None:  # the session was open: it ended without a close frame
                code = type(exc).__name__
            else:
                if not self._stopping:
                    self.events.add(("connect_failed", type(exc).__name__))
                return
        finally:
            self._ws = None
            self.status = None
            if beater is not None:
                beater.cancel()
        if not self._stopping:
            self.events.add(("close", code))

    async def _beat(self, ws: Any) -> None:
        while True:
            await ws.send(json.dumps({
                "type": "node_heartbeat", "node_id": self.node_id, "timestamp": int(time.time() * 1000),
                "resource_usage": {"cpu_percent": 1, "gpu_percent": None, "mem_percent": 1, "running_jobs": 0}}))
            await asyncio.sleep(self.heartbeat_s)

    def _on_frame(self, ws: Any, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "node_register_ack":
            resumed = self.node_id is not None
            self.node_id, self._secret = frame["node_id"], frame["node_secret"]
            self.events.add(("resumed" if resumed else "registered", frame["node_id"]))
        elif kind == "node_status":
            self.status = frame["status"]
            self.events.add(("status", frame["status"]))
            if frame["status"] == "ready":
                self.ready.set()
        elif kind == "error":
            self.events.add(("error", frame.get("code")))
            if frame.get("code") == "NODE_ID_CONFLICT":
                self.node_id = self._secret = None  # as the protocol says: register again as a new node
        elif kind == "job_assign":
            task = asyncio.create_task(self._answer(ws, frame))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

    async def _answer(self, ws: Any, frame: dict[str, Any]) -> None:
        job_id, attempt = frame["job_id"], frame["attempt"]
        try:
            await ws.send(json.dumps({"type": "job_ack", "job_id": job_id, "attempt": attempt}))
            await asyncio.sleep(self.answer_s)
            result = self._answers.get((job_id, attempt)) or json.dumps({
                "type": "job_result", "job_id": job_id, "attempt": attempt, "success": True,
                "output": {"echo": frame.get("payload")}, "duration_ms": int(self.answer_s * 1000)})
            self._answers[(job_id, attempt)] = result
            while len(self._answers) > 1000:  # bounded: only a recent job can be delivered again
                self._answers.popitem(last=False)
            await ws.send(result)
        except ConnectionClosed:
            pass  # the job stays assigned; it is sent again when the node resumes


def release(result: Any) -> None:
    """Unsubscribe from the result now, in the thread that owns its consumer. Left to the
    finalizer it happens whenever the GC gets there, from any thread, possibly after Redis stopped."""
    with contextlib.suppress(Exception):  # a consumer that lost Redis has nothing left to release
        result.backend.remove_pending_result(result)
    result.backend = None  # the finalizer does nothing then


@dataclass
class JobRecord:
    scheduled_s: float
    job_id: str | None = None
    latency_ms: float | None = None
    error: str | None = None
    done: bool = False


class HonestClient:
    """Submits one small job every ``every_s`` from its own threads and times submit -> result.

    Open loop: a scheduler hands out the submissions and a new thread joins when
    all are waiting for results, so a slow job never delays the next one. Each
    thread has its own Celery app (a result consumer is not shared between threads).
    """

    def __init__(self, redis_url: str, every_s: float = 0.5, timeout_s: float = 30.0, max_threads: int = 80,
                 queue: str | None = None) -> None:
        self.redis_url = redis_url
        #: The Celery queue it submits to (None: the default one, shared with every client).
        self.queue = queue
        self.timeout_s = timeout_s
        self.max_threads = max_threads
        self.records: list[JobRecord] = []
        self._lock = threading.Lock()
        self._ticks: Queue[JobRecord | None] = Queue()
        self._idle_threads = 0
        self._threads: list[threading.Thread] = []
        self._scheduler = Loop("honest client", every_s, self._schedule_one)
        self._n = 0

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        self._scheduler.stop()
        for _ in self._threads:
            self._ticks.put(None)

    def _schedule_one(self) -> None:
        record = JobRecord(scheduled_s=now_s())
        with self._lock:
            self.records.append(record)
            if self._idle_threads == 0 and len(self._threads) < self.max_threads:
                thread = threading.Thread(target=self._submitter, name=f"honest submitter {len(self._threads)}",
                                          daemon=True)
                self._threads.append(thread)
                self._idle_threads += 1
                thread.start()
        self._ticks.put(record)

    def _submitter(self) -> None:
        app = Celery(broker=self.redis_url, backend=self.redis_url, set_as_current=False)
        while (record := self._ticks.get()) is not None:
            with self._lock:
                self._idle_threads -= 1
            self._run_one(app, record)
            with self._lock:
                self._idle_threads += 1

    def _run_one(self, app: Any, record: JobRecord) -> None:
        with self._lock:
            self._n += 1
            n = self._n
        started = time.perf_counter()
        result = None
        try:
            result = app.send_task("dispatcher.submit_job", queue=self.queue, kwargs={
                "job_type": "echo", "payload": {"i": n}, "timeout_seconds": 30, "dispatch_timeout_seconds": 30})
            record.job_id = result.id
            output = result.get(timeout=self.timeout_s)
            if output != {"echo": {"i": n}}:
                record.error = f"unexpected output {str(output)[:100]}"
        except Exception as exc:  # noqa: BLE001 - a failed job is the figure
            record.error = f"{type(exc).__name__}: {exc}"[:200]
        record.latency_ms = (time.perf_counter() - started) * 1000
        record.done = True
        if result is not None:
            release(result)

    def between(self, t0_s: float, t1_s: float) -> list[JobRecord]:
        with self._lock:
            return [r for r in self.records if t0_s <= r.scheduled_s <= t1_s]

    def wait_settled(self, until_s: float, timeout_s: float) -> None:
        """Until every job scheduled before ``until_s`` has its result or failure."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if all(r.done for r in self.records if r.scheduled_s <= until_s):
                    return
            time.sleep(0.2)

    def trim_before(self, t_s: float) -> None:
        with self._lock:
            self.records = [r for r in self.records if r.scheduled_s >= t_s or not r.done]


async def register_once(ws_url: str, timeout_s: float) -> float:
    """A new honest node: ms from connecting to node_register_ack."""
    started = time.perf_counter()
    async with asyncio.timeout(timeout_s):
        async with connect(ws_url, compression=None, ping_interval=None, open_timeout=timeout_s, close_timeout=1,
                           proxy=None) as ws:
            await ws.send(register_frame(HONEST_TOKEN, version="hostile-probe"))
            async for raw in ws:
                frame = json.loads(raw)
                if frame.get("type") == "node_register_ack":
                    return (time.perf_counter() - started) * 1000
                if frame.get("type") == "error":
                    raise RuntimeError(f"error {frame.get('code')}")
    raise RuntimeError("session closed before node_register_ack")


class RegistrationProbes:
    """A NEW honest node registers every ``every_s`` while the attack runs (each in its own short session)."""

    def __init__(self, ws_url: str, every_s: float, timeout_s: float) -> None:
        self.ws_url = ws_url
        self.timeout_s = timeout_s
        self.samples = Samples()  # (register ms or None, error or None)
        self._loop = Loop("registration probes", every_s, self._probe)
        self._first = True

    def _probe(self) -> None:
        if self._first:  # the first probe comes one interval into the attack, not at its start
            self._first = False
            return
        started_s = now_s()
        try:
            self.samples.add((asyncio.run(register_once(self.ws_url, self.timeout_s)), None), at_s=started_s)
        except Exception as exc:  # noqa: BLE001
            self.samples.add((None, f"{type(exc).__name__}: {exc}"[:160]), at_s=started_s)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()  # not joined: a probe still waiting is recorded when it ends
