"""The node side of bench/sessions.py: one process drives a slice of the fleet.

Every node follows one wall-clock schedule shared by the client processes:

- at ``t0`` the storm: every node connects (retrying a refusal or a failed
  connect with the reference agent's full-jitter backoff), registers, and
  heartbeats at once and then every ``interval_s``: it turns ready at its
  third heartbeat;
- from ``t1`` to ``t_end`` the steady rhythm: node k heartbeats at
  ``t1 + k * interval_s / n`` and every ``interval_s`` after, so the fleet
  sends n / interval_s heartbeats a second, evenly. The flapping nodes
  report a failed model whenever they are ready and a good one whenever they
  are degraded; each heartbeat that must change the status is timed to the
  node_status that says so.

Echo mode (the bare flask-sock baseline) opens the same sessions and sends
one frame per session over one interval, timing its echo.
"""

from __future__ import annotations

import asyncio
import json
import time
from multiprocessing.connection import Connection
from typing import Any

from wsclient import Refused, Session, backoff_s, open_session

_REGISTER = b'{"type":"node_register","max_concurrent_jobs":2,"installed_models":[{"model_id":"m","status":"ready"}]}'


def _heartbeat(node_id: str, healthy: bool) -> bytes:
    status = "ready" if healthy else "error"
    return (f'{{"type":"node_heartbeat","node_id":"{node_id}","timestamp":{int(time.time() * 1000)},'
            '"resource_usage":{"cpu_percent":5,"gpu_percent":1,"mem_percent":10,"running_jobs":0},'
            f'"installed_models":[{{"model_id":"m","status":"{status}"}}]}}').encode()


class Node:
    """One simulated node: its session, its status as told, and what was timed."""

    __slots__ = (
        "ack",
        "errors",
        "expect",
        "fail_run",
        "flapping",
        "k",
        "node_id",
        "ready",
        "sent_s",
        "session",
        "status",
        "statuses",
        "window",
    )

    def __init__(self, k: int, flapping: bool) -> None:
        self.k = k
        self.flapping = flapping
        self.session: Session | None = None
        self.node_id = ""
        self.status = ""
        self.ack: asyncio.Future[None] | None = None
        self.ready: asyncio.Future[None] | None = None
        #: When the last heartbeat went out (loop time), and whether it must change the status.
        self.sent_s = 0.0
        self.expect: str | None = None
        #: The health window the server keeps (last 5 results), mirrored to know when a change is due.
        self.window = ""
        self.fail_run = 0
        self.statuses: list[float] = []
        self.errors = 0

    def on_text(self, payload: bytes) -> None:
        frame = json.loads(payload)
        kind = frame.get("type")
        if kind == "node_register_ack":
            self.node_id = frame["node_id"]
            if self.ack is not None and not self.ack.done():
                self.ack.set_result(None)
        elif kind == "node_status":
            status = frame["status"]
            if status == "ready" and self.ready is not None and not self.ready.done():
                self.ready.set_result(None)
            if self.expect is not None and status == self.expect:
                self.statuses.append((asyncio.get_running_loop().time() - self.sent_s) * 1000)
                self.expect = None
            self.status = status
        elif kind == "error":
            self.errors += 1
            if self.ack is not None and not self.ack.done():  # the agent reconnects, after its backoff
                self.ack.set_exception(ConnectionError(frame.get("code")))

    def heartbeat(self, healthy: bool, timed: bool) -> None:
        assert self.session is not None
        self.window = (self.window + ("1" if healthy else "0"))[-5:]
        self.fail_run = 0 if healthy else self.fail_run + 1
        self.expect = None
        if timed and self.status == "ready" and not healthy and (
                self.fail_run >= 3 or self.window.count("0") >= 3):
            self.expect = "degraded"
        elif timed and self.status == "degraded" and healthy:
            self.expect = "ready"
        self.sent_s = asyncio.get_running_loop().time()
        self.session.send_text(_heartbeat(self.node_id, healthy))


async def _sleep_until(wall_s: float) -> None:
    delay = wall_s - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _connect(spec: dict[str, Any], k: int, on_text: Any, stats: dict[str, int]) -> Session:
    failures = 0
    while True:
        try:
            return await open_session(spec["host"], spec["port"], "/ws/node", on_text,
                                      source=spec["sources"][k % len(spec["sources"])])
        except (Refused, OSError, TimeoutError) as exc:
            stats["refused" if isinstance(exc, Refused) else "connect_failed"] += 1
            failures += 1
            await asyncio.sleep(backoff_s(failures))


async def _node_life(spec: dict[str, Any], node: Node, out: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    interval_s, n = spec["interval_s"], spec["n"]
    await _sleep_until(spec["t0"])
    started_s = loop.time()
    failures = 0
    while True:  # a session refused or ended before its ack starts over, as an agent's would
        node.ack, node.ready = loop.create_future(), loop.create_future()
        node.session = await _connect(spec, node.k, node.on_text, out["counts"])
        node.session.send_text(_REGISTER)
        await asyncio.wait([node.ack, node.session.closed], return_when=asyncio.FIRST_COMPLETED)
        if node.ack.done() and node.ack.exception() is None:
            break
        out["counts"]["lost"] += 1
        node.session.abort()
        failures += 1
        await asyncio.sleep(backoff_s(failures))
    out["registered_s"].append(loop.time() - started_s)
    first_s = time.time()
    node.heartbeat(True, False)
    for j in (1, 2):
        await _sleep_until(first_s + j * interval_s)
        node.heartbeat(True, False)
    third_s = loop.time()
    try:
        await asyncio.wait_for(asyncio.shield(node.ready), spec["t1"] + interval_s - time.time())
        out["ready_s"].append(loop.time() - started_s)
        out["third_to_ready_ms"].append((loop.time() - third_s) * 1000)
    except TimeoutError:
        out["counts"]["not_ready"] += 1
    if len(out["ready_s"]) + out["counts"]["not_ready"] == out["nodes"]:
        out["storm_over"].set()
    # Keep the storm's rhythm until the steady schedule begins, then the even one.
    steady_s = spec["t1"] + node.k * interval_s / n
    next_s = first_s + 3 * interval_s
    while next_s < steady_s - 1.0:
        await _sleep_until(next_s)
        node.heartbeat(True, False)
        next_s += interval_s
    next_s = steady_s
    while next_s < spec["t_end"]:
        await _sleep_until(next_s)
        if node.flapping:
            node.heartbeat(node.status == "degraded", True)
        else:
            node.heartbeat(True, False)
        next_s += interval_s
    await asyncio.sleep(min(5.0, interval_s / 2))  # the last statuses come back


async def _echo_life(spec: dict[str, Any], k: int, out: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    await _sleep_until(spec["t0"])
    echoed: asyncio.Future[None] = loop.create_future()
    def on_echo(_: bytes) -> None:
        if not echoed.done():
            echoed.set_result(None)

    session = await _connect(spec, k, on_echo, out["counts"])
    out["connected"] += 1
    if out["connected"] == out["nodes"]:
        out["storm_over"].set()
    await _sleep_until(spec["t1"] + k * spec["interval_s"] / spec["n"])
    sent_s = loop.time()
    session.send_text(b'{"type":"ping"}')
    await echoed
    out["echo_ms"].append((loop.time() - sent_s) * 1000)
    out["sessions"].append(session)


async def _drive(spec: dict[str, Any], pipe: Connection) -> None:
    out: dict[str, Any] = {"nodes": len(spec["indices"]), "registered_s": [], "ready_s": [], "third_to_ready_ms": [],
                           "echo_ms": [], "connected": 0, "sessions": [], "storm_over": asyncio.Event(),
                           "counts": {"refused": 0, "connect_failed": 0, "lost": 0, "not_ready": 0}}
    flapping = set(spec["flapping"])
    nodes = [Node(k, k in flapping) for k in spec["indices"]]
    if spec["mode"] == "echo":
        lives = [asyncio.ensure_future(_echo_life(spec, k, out)) for k in spec["indices"]]
    else:
        lives = [asyncio.ensure_future(_node_life(spec, node, out)) for node in nodes]
    await out["storm_over"].wait()
    pipe.send(("storm_over", {key: out[key] for key in ("registered_s", "ready_s", "third_to_ready_ms", "counts")}))
    await asyncio.gather(*lives)
    flaps = [ms for node in nodes for ms in node.statuses]
    missed = sum(1 for node in nodes if node.expect is not None)
    pipe.send(("steady_over", {"flap_ms": flaps, "flap_missed": missed, "echo_ms": out["echo_ms"],
                               "errors": sum(node.errors for node in nodes), "counts": out["counts"]}))
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # the parent has measured the server
    for session in [node.session for node in nodes if node.session] + out["sessions"]:
        session.close()
    await asyncio.sleep(1.0)
    for session in [node.session for node in nodes if node.session] + out["sessions"]:
        session.abort()


def run(spec: dict[str, Any], pipe: Connection) -> None:
    """A client process's main: drive ``spec["indices"]`` through the schedule, reporting on ``pipe``."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_drive(spec, pipe))
