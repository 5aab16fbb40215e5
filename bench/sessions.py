"""How many node sessions one gevent web process holds, and what a heartbeat costs.

    python bench/sessions.py --sessions 10000
    python bench/sessions.py --sweep 1000,2500,5000,10000   # and plots into docs/img/

Against one gunicorn gevent worker (the project's gunicorn settings), N nodes
from client processes using a light WebSocket client (bench/wsclient.py):

1. storm: all N connect, register and heartbeat at once, as after a web
   restart (a refused handshake is retried with the reference agent's
   backoff). Each node heartbeats every 15 s and is ready at its third:
   reported are the time until the last is ready and the third heartbeat ->
   ready latency;
2. steady: every node heartbeats every 15 s, spread evenly (N / 15 a second);
   1% of them flap between ready and degraded, and each heartbeat that
   changes a status is timed to its node_status.

The baseline is a bare flask-sock echo (bench/echo_app.py) under the same
gunicorn settings, in the same run: N sessions, one echo each. Beside both:
the worker's RSS and count of Python objects per session (BENCH_PROBE: the
worker logs them on SIGUSR1), its Redis connections (the most seen, sampled)
and its garbage-collection pauses of 10 ms or more. The last line printed is
one JSON object of every figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

import sessions_client
from common import ROOT, LocalRedis, env_for, free_port, pct, raise_open_files_limit, start, wait_http

GUNICORN = ["-m", "gunicorn", "-c", "python:web.gunicorn_conf"]
#: Seconds between two heartbeats of a node (the dispatcher's default).
INTERVAL_S = 15.0
#: Share of the fleet flapping between ready and degraded in the steady phase.
FLAPPING = 0.01
#: Nodes per client source address (127.0.x.y): a fleet comes from many addresses.
NODES_PER_ADDRESS = 50


def _worker(master: int) -> psutil.Process:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        children = psutil.Process(master).children()
        if children:
            return children[0]
        time.sleep(0.1)
    raise SystemExit("gunicorn started no worker")


class Server:
    """One gunicorn worker under test, and what is read from it."""

    def __init__(self, name: str, app: str | None, n: int, store: LocalRedis, tmp: Path,
                 settings: dict[str, str]) -> None:
        self.port = free_port()
        self.log = tmp / f"{name}.log"
        self.redis_port = int(store.url.rsplit(":", 1)[1].split("/")[0])
        env = env_for(store.url, self.port, **{"web_worker_connections": str(n + 500), "require_gpu": "false",
                                               "required_models": '["m"]', "gc_pause_log_ms": "10", **settings})
        env["BENCH_PROBE"] = "1"
        extra = ["--pythonpath", str(ROOT), app] if app else []
        self.proc = start([sys.executable, *GUNICORN, *extra], env, self.log)
        wait_http(f"http://127.0.0.1:{self.port}/healthz", 30)
        self.worker = _worker(self.proc.pid)
        self.redis_max = 0
        self._sampling = threading.Event()

    def probe(self) -> dict[str, Any]:
        """RSS now, and the worker's own count of Python objects (it logs it on SIGUSR1)."""
        seen = self.log.read_text().count('"event": "bench_probe"')
        self.worker.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            lines = [line for line in self.log.read_text().splitlines() if '"event": "bench_probe"' in line]
            if len(lines) > seen:
                probe = json.loads(lines[-1])
                return {"rss": self.worker.memory_info().rss, "objects": probe["objects"], "types": probe["types"]}
            time.sleep(0.2)
        raise SystemExit("the worker did not answer the probe")

    def reclaim(self) -> int:
        """Objects no collection would free while frozen (SIGUSR2: web/gcpolicy.py's reclaim)."""
        self.worker.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if '"event": "gc_reclaimed"' in line:
                    return int(json.loads(line)["unreachable"])
            time.sleep(0.2)
        return -1

    def redis_connections(self) -> int:
        return sum(1 for c in self.worker.net_connections("tcp") if c.raddr and c.raddr.port == self.redis_port)

    def sample_redis(self, every_s: float = 3.0) -> None:
        def loop() -> None:
            while not self._sampling.wait(every_s):
                try:
                    self.redis_max = max(self.redis_max, self.redis_connections())
                except psutil.Error:
                    return
        threading.Thread(target=loop, daemon=True).start()

    def gc_pauses(self, from_s: float, to_s: float, field: str = "pause_ms") -> list[float]:
        """The worker's logged collections of 10 ms or more between two wall times:
        ``pause_ms`` (wall time) or ``cpu_ms`` (the worker's own CPU time in them)."""
        pauses = []
        for line in self.log.read_text().splitlines():
            if '"event": "gc_pause"' in line:
                entry = json.loads(line)
                if from_s <= entry["at_s"] <= to_s:
                    pauses.append(entry[field])
        return pauses

    def stop(self) -> None:
        self._sampling.set()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except Exception:  # noqa: BLE001 - a worker stuck closing 10,000 sessions
            self.proc.kill()
            self.proc.wait(10)


def _clients(mode: str, n: int, port: int, clients: int, t0: float, t1: float, t_end: float) -> list[Any]:
    context = multiprocessing.get_context("spawn")
    sources = [f"127.0.{1 + a // 250}.{1 + a % 250}" for a in range(max(1, n // NODES_PER_ADDRESS))]
    flapping = list(range(0, n, int(1 / FLAPPING)))
    started = []
    for c in range(clients):
        ours, theirs = context.Pipe()
        spec = {"mode": mode, "host": "127.0.0.1", "port": port, "n": n, "indices": list(range(c, n, clients)),
                "sources": sources, "flapping": flapping, "interval_s": INTERVAL_S, "t0": t0, "t1": t1, "t_end": t_end}
        process = context.Process(target=sessions_client.run, args=(spec, theirs), daemon=True)
        process.start()
        started.append((process, ours))
    return started


def _gather(clients: list[Any], stage: str, timeout_s: float) -> list[dict[str, Any]]:
    replies = []
    for _process, pipe in clients:
        if not pipe.poll(timeout_s):
            raise SystemExit(f"a client process did not report {stage} in {timeout_s:.0f} s")
        kind, data = pipe.recv()
        assert kind == stage, (kind, stage)
        replies.append(data)
    return replies


def _merged(replies: list[dict[str, Any]], key: str) -> Any:
    first = replies[0][key]
    if isinstance(first, dict):
        return {k: sum(r[key][k] for r in replies) for k in first}
    if isinstance(first, list):
        return [v for r in replies for v in r[key]]
    return sum(r[key] for r in replies)


def _finish(clients: list[Any]) -> None:
    for _process, pipe in clients:
        pipe.send("close")
    for process, _ in clients:
        process.join(30)
        if process.is_alive():
            process.kill()


def _p(values: list[float], q: float) -> float | None:
    return round(pct(values, q), 2) if values else None


def run_echo(n: int, args: argparse.Namespace, store: LocalRedis, tmp: Path) -> dict[str, Any]:
    server = Server("echo", "bench.echo_app:app", n, store, tmp, {})
    try:
        idle = server.probe()
        t0 = time.time() + 1
        t1 = t0 + args.open_s
        clients = _clients("echo", n, server.port, args.clients, t0, t1, t1 + INTERVAL_S)
        opened = _gather(clients, "storm_over", args.open_s + 120)
        open_s = time.time() - t0
        done = _gather(clients, "steady_over", INTERVAL_S + 120)
        full = server.probe()
        _finish(clients)
    finally:
        server.stop()
    echo_ms = _merged(done, "echo_ms")
    return {"open_s": round(open_s, 1), "refused": _merged(opened, "counts")["refused"],
            "echo_p50_ms": _p(echo_ms, 0.5), "echo_p99_ms": _p(echo_ms, 0.99),
            "rss_idle_mib": round(idle["rss"] / 2**20, 1), "rss_mib": round(full["rss"] / 2**20, 1),
            "rss_per_session_kib": round((full["rss"] - idle["rss"]) / n / 1024, 1),
            "objects_per_session": round((full["objects"] - idle["objects"]) / n, 1), "types": full["types"]}


def run_dispatcher(n: int, args: argparse.Namespace, store: LocalRedis, tmp: Path,
                   settings: dict[str, str]) -> dict[str, Any]:
    store_client = __import__("redis").Redis.from_url(store.url)
    store_client.flushall()
    server = Server("dispatcher", None, n, store, tmp, settings)
    try:
        idle = server.probe()
        server.sample_redis()
        t0 = time.time() + 1
        t1 = t0 + args.storm_s
        t_end = t1 + args.steady_s
        clients = _clients("dispatcher", n, server.port, args.clients, t0, t1, t_end)
        storm = _gather(clients, "storm_over", args.storm_s + 2 * INTERVAL_S + 120)
        after_storm_rss = server.worker.memory_info().rss
        steady = _gather(clients, "steady_over", max(0.0, t_end - time.time()) + 120)
        full = server.probe()
        redis_now = server.redis_connections()
        _finish(clients)
        time.sleep(5)  # the sessions end
        unreachable = server.reclaim()
        storm_pauses, steady_pauses = server.gc_pauses(t0, t1), server.gc_pauses(t1, t_end)
        steady_cpu = server.gc_pauses(t1, t_end, "cpu_ms")
    finally:
        server.stop()
    ready_s, third_ms = _merged(storm, "ready_s"), _merged(storm, "third_to_ready_ms")
    registered_s, flap_ms = _merged(storm, "registered_s"), _merged(steady, "flap_ms")
    counts = _merged(steady, "counts")
    return {
        "registered": len(registered_s), "ready": len(ready_s), "not_ready": counts["not_ready"],
        "refused": counts["refused"], "connect_failed": counts["connect_failed"], "lost": counts["lost"],
        "last_registered_s": round(max(registered_s, default=float("nan")), 1),
        "last_ready_s": round(max(ready_s, default=float("nan")), 1),
        "ready_p50_s": _p(ready_s, 0.5), "ready_p99_s": _p(ready_s, 0.99),
        "third_to_ready_p50_ms": _p(third_ms, 0.5), "third_to_ready_p99_ms": _p(third_ms, 0.99),
        "third_to_ready_max_ms": round(max(third_ms, default=float("nan")), 1),
        "flap_p50_ms": _p(flap_ms, 0.5), "flap_p99_ms": _p(flap_ms, 0.99), "flap_samples": len(flap_ms),
        "flap_missed": _merged(steady, "flap_missed"), "errors": _merged(steady, "errors"),
        "steady_gc_pauses_10ms": len(steady_pauses), "steady_gc_pauses_50ms": sum(p >= 50 for p in steady_pauses),
        "steady_gc_longest_ms": max(steady_pauses, default=0), "steady_gc_longest_cpu_ms": max(steady_cpu, default=0),
        "storm_gc_pauses_10ms": len(storm_pauses), "storm_gc_longest_ms": max(storm_pauses, default=0),
        "redis_connections_max": max(server.redis_max, redis_now),
        "rss_idle_mib": round(idle["rss"] / 2**20, 1), "rss_after_storm_mib": round(after_storm_rss / 2**20, 1),
        "rss_mib": round(full["rss"] / 2**20, 1),
        "rss_per_session_kib": round((full["rss"] - idle["rss"]) / n / 1024, 1),
        "objects_per_session": round((full["objects"] - idle["objects"]) / n, 1), "types": full["types"],
        "frozen_garbage_per_closed_session": round(unreachable / n, 2),
    }


def measure(n: int, args: argparse.Namespace, settings: dict[str, str]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    store = LocalRedis(tmp / "redis", append_only=False).start()
    try:
        echo = run_echo(n, args, store, tmp)
        mine = run_dispatcher(n, args, store, tmp, settings)
    finally:
        store.stop()
    return {"sessions": n, "echo": echo, "dispatcher": mine, "logs": str(tmp),
            "rss_ratio": round(mine["rss_per_session_kib"] / echo["rss_per_session_kib"], 2),
            "objects_ratio": round(mine["objects_per_session"] / echo["objects_per_session"], 2)}


def report(row: dict[str, Any]) -> None:
    n, e, d = row["sessions"], row["echo"], row["dispatcher"]
    print(f"\n{n} sessions on one gunicorn gevent worker ({psutil.cpu_count()} cores), logs in {row['logs']}\n")
    table = [
        ("sessions open / registered", f"{n} in {e['open_s']} s",
         f"{d['registered']} (last at {d['last_registered_s']} s)"),
        ("handshakes refused, retried", e["refused"], d["refused"]),
        ("storm: ready / not ready", "", f"{d['ready']} / {d['not_ready']}"),
        ("storm: last ready after start", "",
         f"{d['last_ready_s']} s (p50 {d['ready_p50_s']} s, p99 {d['ready_p99_s']} s)"),
        ("storm: 3rd heartbeat -> ready", "",
         f"p50 {d['third_to_ready_p50_ms']} ms  p99 {d['third_to_ready_p99_ms']} ms"),
        ("steady: heartbeat -> node_status", f"echo p50 {e['echo_p50_ms']} ms  p99 {e['echo_p99_ms']} ms",
         f"p50 {d['flap_p50_ms']} ms  p99 {d['flap_p99_ms']} ms (n={d['flap_samples']}, missed {d['flap_missed']})"),
        ("steady: GC pauses >= 10 / >= 50 ms", "", f"{d['steady_gc_pauses_10ms']} / {d['steady_gc_pauses_50ms']}, "
                                                    f"longest {d['steady_gc_longest_ms']} ms "
                                                    f"(CPU {d['steady_gc_longest_cpu_ms']} ms)"),
        ("storm: GC pauses >= 10 ms", "", f"{d['storm_gc_pauses_10ms']}, longest {d['storm_gc_longest_ms']} ms"),
        ("Redis connections (most seen)", "", d["redis_connections_max"]),
        ("RSS idle -> with sessions", f"{e['rss_idle_mib']} -> {e['rss_mib']} MiB",
         f"{d['rss_idle_mib']} -> {d['rss_mib']} MiB"),
        ("RSS per session", f"{e['rss_per_session_kib']} KiB", f"{d['rss_per_session_kib']} KiB ({row['rss_ratio']}x)"),
        ("Python objects per session", e["objects_per_session"],
         f"{d['objects_per_session']} ({row['objects_ratio']}x)"),
        ("frozen cyclic garbage per ended session", "", f"{d['frozen_garbage_per_closed_session']} objects"),
    ]
    print(f"{'':38s} {'bare flask-sock echo':34s} dispatcher")
    for label, bare, mine in table:
        print(f"{label:38s} {bare!s:34s} {mine}")


def _figure(path: Path, sizes: list[int], series: list[tuple[list[Any], str, str]], ylabel: str,
            target: float | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for values, style, label in series:
        ax.plot(sizes, values, style, label=label)
    if target is not None:
        ax.axhline(target, color="grey", linewidth=0.8, label=f"target {target:g} {ylabel}")
    ax.set_xlabel("node sessions on one gevent worker (heartbeat every 15 s)")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plot(rows: list[dict[str, Any]], folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [r["sessions"] for r in rows]
    mine = [r["dispatcher"] for r in rows]
    bare = [r["echo"] for r in rows]
    return [
        _figure(folder / "sessions-heartbeat-p99.png", sizes, [
            ([d["flap_p99_ms"] for d in mine], "o-", "heartbeat -> node_status p99"),
            ([d["flap_p50_ms"] for d in mine], "o--", "heartbeat -> node_status p50"),
            ([e["echo_p99_ms"] for e in bare], "s:", "bare echo round trip p99")], "ms", target=50),
        _figure(folder / "sessions-rss.png", sizes, [
            ([d["rss_mib"] for d in mine], "o-", "dispatcher worker"),
            ([e["rss_mib"] for e in bare], "s:", "bare flask-sock echo worker")], "RSS (MiB)"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=10000)
    parser.add_argument("--sweep", help="comma-separated session counts, one full run each, then the plots")
    parser.add_argument("--storm-s", type=float, default=50.0,
                        help="seconds given to the storm before the steady phase")
    parser.add_argument("--steady-s", type=float, default=180.0, help="seconds of steady heartbeats")
    parser.add_argument("--open-s", type=float, default=30.0, help="seconds given to the echo sessions to open")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a dispatcher setting for the web process (repeatable)")
    parser.add_argument("--plots", default=str(ROOT / "docs" / "img"), help="where --sweep writes its PNG plots")
    args = parser.parse_args()
    raise_open_files_limit()
    settings = dict(kv.split("=", 1) for kv in args.set)
    sizes = [int(s) for s in args.sweep.split(",")] if args.sweep else [args.sessions]
    rows = []
    for n in sizes:
        row = measure(n, args, settings)
        report(row)
        rows.append(row)
    summary: dict[str, Any] = {"cores": psutil.cpu_count(), "interval_s": INTERVAL_S, "flapping": FLAPPING,
                               "steady_s": args.steady_s, "settings": settings}
    if args.sweep:
        summary["plots"] = plot(rows, Path(args.plots))
    for row in rows:
        for side in ("echo", "dispatcher"):
            row[side].pop("types")
    summary["runs"] = rows
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
