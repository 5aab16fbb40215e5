"""The system bench/chaos.py runs, the supervisor that keeps it running, and the killer.

Redis, the Procfile's web, worker and beat processes and the reference node
agents are each a Proc: the Supervisor restarts whatever dies, as a platform
restarts a crashed dyno, and the killer SIGKILLs them on a seeded schedule.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from common import (
    ROOT,
    LocalRedis,
    answers_http,
    celery_env,
    env_for,
    free_port,
    killpg,
    procfile_command,
    start,
)
from dispatcher.keys import Keys

#: Fast settings, so that a fault resolves in seconds rather than minutes.
FAST_SETTINGS = {
    "require_gpu": "false",
    "resource_threshold_percent": "100",
    "heartbeat_interval_seconds": "0.5",
    "heartbeat_timeout_seconds": "3",
    "periodic_scan_interval_seconds": "0.5",
    "job_reassign_grace_seconds": "2",
    "delivery_sweep_interval_seconds": "1",
}
KEYS = Keys()
#: A product process that died by itself comes back after this, as a dyno would.
CRASH_RESTART_S = 1.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- processes ------------------------------------------------------------------


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a process in its own session (so killpg reaches its children), appending to its log:
    one log per process across its restarts.

    PYTHONPATH names this tree first: a process restarted mid-run must load the same code as
    the others, from the tree the bench lives in (a copy, say), not from wherever the venv's
    editable install points. CHAOS_BENCH marks every process of the run, to find strays."""
    env = {**env, "CHAOS_BENCH": str(log_path.parent)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with log_path.open("ab") as out:
        out.write(f"\n=== bench: started at {time.strftime('%H:%M:%S')} ===\n".encode())
    return start(args, env, log_path, append=True)


@dataclass
class Proc:
    """One process the supervisor keeps running: a dyno, or a node machine."""

    name: str
    kind: str  # web, worker, beat, node, redis
    launch: Callable[[], subprocess.Popen[bytes]]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    killed_by_us: bool = False
    restart_delay_s: float = CRASH_RESTART_S
    restart_at_s: float | None = None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class Supervisor:
    """Restarts whatever dies; counts the deaths the killer did not cause."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.kills: Counter[str] = Counter()
        self.restarts: Counter[str] = Counter()
        self.unexpected: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)

    def add(self, proc: Proc) -> Proc:
        if proc.popen is None:
            proc.popen = proc.launch()
        with self._lock:
            self.procs.append(proc)
        return proc

    def start(self) -> None:
        self._thread.start()

    def kill(self, proc: Proc, down_s: float, wait_alive_s: float = 30.0) -> bool:
        """SIGKILL the process group; the supervisor brings it back after ``down_s``.
        Waits for the process to be up first (it may be restarting from an earlier fault)."""
        deadline = time.monotonic() + wait_alive_s
        while time.monotonic() < deadline:
            with self._lock:
                if proc.alive() and proc.restart_at_s is None:
                    proc.killed_by_us = True
                    proc.restart_delay_s = down_s
                    killpg(proc.popen.pid)  # type: ignore[union-attr]
                    self.kills[proc.kind] += 1
                    return True
            time.sleep(0.1)
        return False

    def all_up(self) -> bool:
        with self._lock:
            return all(p.alive() and p.restart_at_s is None for p in self.procs)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _loop(self) -> None:
        while not self._stopping.wait(0.1):
            for proc in list(self.procs):
                self._look_after(proc)

    def _look_after(self, proc: Proc) -> None:
        assert proc.popen is not None
        with self._lock:
            if proc.restart_at_s is None and proc.popen.poll() is not None:
                # A gunicorn worker or a celery pool child may outlive its parent: take the group down too.
                killpg(proc.popen.pid)
                if not proc.killed_by_us:
                    self.unexpected.append({"name": proc.name, "kind": proc.kind, "returncode": proc.popen.returncode,
                                            "at": time.strftime("%H:%M:%S"), "log": str(proc.log_path)})
                    log(f"UNEXPECTED exit of {proc.name} (returncode {proc.popen.returncode}); see {proc.log_path}")
                delay_s = proc.restart_delay_s if proc.killed_by_us else CRASH_RESTART_S
                proc.restart_at_s = time.monotonic() + delay_s
            due = proc.restart_at_s is not None and time.monotonic() >= proc.restart_at_s
        if due and not self._stopping.is_set():
            try:
                popen = proc.launch()  # outside the lock: Redis blocks until it answers
            except Exception as exc:  # noqa: BLE001 - keep supervising; try again shortly
                log(f"restart of {proc.name} failed: {exc}")
                with self._lock:
                    proc.restart_at_s = time.monotonic() + CRASH_RESTART_S
                return
            with self._lock:
                proc.popen, proc.restart_at_s, proc.killed_by_us = popen, None, False
                proc.restart_delay_s = CRASH_RESTART_S
                self.restarts[proc.kind] += 1

    def stop_everything(self) -> None:
        """SIGKILL the nodes (SIGTERM would make them drain for 30 s), SIGTERM the rest, then
        SIGKILL what is left after 10 s; Redis goes last, after everything that uses it."""
        self.stop()
        with self._lock:
            procs = list(self.procs)
        for proc in procs:
            if proc.popen is not None and proc.kind != "redis":
                killpg(proc.popen.pid, signal.SIGKILL if proc.kind == "node" else signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in procs:
            if proc.popen is None or proc.kind == "redis":
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            killpg(proc.popen.pid)  # whatever is left of the group
            proc.popen.wait()
        for proc in procs:
            if proc.popen is not None and proc.kind == "redis":
                killpg(proc.popen.pid, signal.SIGTERM)
                try:
                    proc.popen.wait(10)
                except subprocess.TimeoutExpired:
                    killpg(proc.popen.pid)
                    proc.popen.wait()


# --- the system under test -------------------------------------------------------


@dataclass
class System:
    tmp: Path
    store: LocalRedis
    supervisor: Supervisor
    webs: list[Proc] = field(default_factory=list)
    web_ports: list[int] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)
    nodes: list[Proc] = field(default_factory=list)
    redis_proc: Proc | None = None


def start_system(args: argparse.Namespace, tmp: Path, supervisor: Supervisor) -> System:
    logs = tmp / "logs"
    for folder in (logs, tmp / "runs", tmp / "state"):
        folder.mkdir(parents=True, exist_ok=True)
    store = LocalRedis(tmp / "redis", append_only=True, appendfsync="always")
    system = System(tmp, store, supervisor)
    system.redis_proc = supervisor.add(Proc("redis", "redis", functools.partial(start_redis, store),
                                            tmp / "redis" / "redis.log"))
    settings = dict(FAST_SETTINGS)
    for i in range(args.webs):
        add_web(system, f"web-{i + 1}", settings)
    for i in range(2):
        env = celery_env(store.url, **settings)
        if args.worker_concurrency:
            env["WORKER_CONCURRENCY"] = str(args.worker_concurrency)
        system.workers.append(supervisor.add(procfile_proc(system, "worker", f"worker-{i + 1}", env)))
    for i in range(2):
        # Each beat keeps its schedule file in its own folder (the Procfile names it after $TMPDIR).
        beat_dir = tmp / f"beat-{i + 1}"
        beat_dir.mkdir(exist_ok=True)
        env = {**celery_env(store.url, **settings), "TMPDIR": str(beat_dir)}
        supervisor.add(procfile_proc(system, "beat", f"beat-{i + 1}", env))
    for i in range(args.nodes):
        system.nodes.append(supervisor.add(node_proc(system, i)))
    return system


def procfile_proc(system: System, kind: str, name: str, env: dict[str, str]) -> Proc:
    """The Procfile's ``kind`` process, logging to logs/<name>.log."""
    command = ["bash", "-c", f"exec {procfile_command(kind)}"]
    path = system.tmp / "logs" / f"{name}.log"
    return Proc(name, kind, functools.partial(spawn, command, env, path), path)


def start_redis(store: LocalRedis) -> subprocess.Popen[bytes]:
    """Start (or start again, on the same port and from the same AOF) and wait until it answers.
    The AOF is never rewritten: it keeps every command of the run, the evidence of where a
    message went (an LPUSH by the client, the BRPOP of a worker, an HSET of kombu's unacked)."""
    process = store.start().process
    assert process is not None
    client = redis.Redis(port=store.port)
    try:
        client.config_set("auto-aof-rewrite-percentage", 0)
    finally:
        client.close()
    return process


def add_web(system: System, name: str, settings: dict[str, str], tries: int = 3) -> None:
    """The Procfile's web process on a free port. The machine is shared: another program may
    take the port between our pick and gunicorn's bind, so a web that does not come up is
    started again on another port."""
    for _ in range(tries):
        port = free_port()
        proc = procfile_proc(system, "web", name, env_for(system.store.url, port, **settings))
        proc.popen = proc.launch()
        if answers_http(f"http://127.0.0.1:{port}/readyz", 60, proc.popen):
            system.supervisor.add(proc)
            system.webs.append(proc)
            system.web_ports.append(port)
            return
        killpg(proc.popen.pid)
        proc.popen.wait()
        log(f"{name} did not come up on port {port}; trying another port")
    raise SystemExit(f"{name} did not start; see {proc.log_path}")


def node_proc(system: System, index: int) -> Proc:
    """A reference agent on one of the web processes, with its own state file and log."""
    port = system.web_ports[index % len(system.web_ports)]
    env = env_for(system.store.url, port)
    env["PYTHONPATH"] = str(ROOT / "bench")  # for chaos_handler
    env["CHAOS_RUNS_DIR"] = str(system.tmp / "runs")
    env["CHAOS_NODE"] = f"node-{index:03d}"
    command = [sys.executable, "-m", "dispatcher.agent", "--url", f"ws://127.0.0.1:{port}/ws/node",
               "--state-file", str(system.tmp / "state" / f"node-{index:03d}.json"), "--model", "m",
               "--max-concurrent-jobs", "2", "--handler", "chaos_handler:run"]
    path = system.tmp / "logs" / f"node-{index:03d}.log"
    return Proc(f"node-{index:03d}", "node", functools.partial(spawn, command, env, path), path)


def wait_nodes_ready(r: redis.Redis, count: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    ready = 0
    while time.monotonic() < deadline:
        try:
            ready = r.scard(KEYS.status_set("ready"))
        except redis.RedisError:
            ready = 0
        if ready >= count:
            break
        time.sleep(0.5)
    return ready


# --- faults ------------------------------------------------------------------------


@dataclass
class Fault:
    at_s: float
    target: Proc
    down_s: float


def plan_faults(rng: random.Random, system: System, window_s: float, node_fraction: float) -> list[Fault]:
    """Each web process and each worker once, a fraction of the nodes, Redis once; at seeded
    moments inside the submission window (not at its very ends, so every fault meets traffic)."""
    def moment() -> float:
        return rng.uniform(0.1, 0.85) * window_s
    faults = [Fault(moment(), web, CRASH_RESTART_S) for web in system.webs]
    faults += [Fault(moment(), worker, CRASH_RESTART_S) for worker in system.workers]
    doomed = rng.sample(system.nodes, max(1, round(node_fraction * len(system.nodes))))
    faults += [Fault(moment(), node, rng.uniform(1.0, 4.0)) for node in doomed]
    assert system.redis_proc is not None
    faults.append(Fault(moment(), system.redis_proc, 2.0))
    return sorted(faults, key=lambda f: f.at_s)


def run_killer(faults: list[Fault], supervisor: Supervisor, t0_s: float, done: threading.Event) -> None:
    try:
        for fault in faults:
            time.sleep(max(0.0, t0_s + fault.at_s - time.monotonic()))
            if supervisor.kill(fault.target, fault.down_s):
                log(f"killer: SIGKILL {fault.target.name} (back in {fault.down_s:.1f} s)")
            else:
                log(f"killer: {fault.target.name} was not up within 30 s; fault skipped")
    finally:
        done.set()
