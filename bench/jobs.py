"""Jobs end to end, beside plain Celery, in one run.

    python bench/jobs.py [--jobs 1000] [--nodes 8] [--web 1] [--workers 1]

Starts a private redis-server, the Procfile's web (``--web`` of them, the nodes
spread over them), worker (``--workers``) and beat, a plain Celery worker for a
no-op task with the same concurrency, and in-process fake nodes that
acknowledge and answer at once. A client with only celery then measures:

1. throughput: a burst of N jobs (dispatcher.submit_job), first submit to last
   result, beside a burst of N no-op tasks;
2. latency at a steady rate: jobs submitted on a clock (open loop) at a rate
   well below saturation and at 80% of the burst's rate; submit -> job_assign
   at the node, beside the no-op task's round trip (send_task -> result) at the
   same rates;
3. waiting jobs: every slot busy (the nodes hold each job ``--hold-ms``), twice
   as many jobs as slots; for each job that had to wait, the time from the
   result that freed a slot on its node to its job_assign there.

The last line is one JSON object with every figure and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.result import AsyncResult, ResultSet
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from common import ROOT, LocalRedis, env_for, free_port, pct, start, summary, wait_http

JOB = {"job_type": "bench", "payload": {"n": 1}}


class Fleet:
    """Fake nodes in a thread of their own: what they saw, and how long they hold a job."""

    def __init__(self) -> None:
        self.assigned_at: dict[str, float] = {}
        self.results_sent: dict[str, list[float]] = defaultdict(list)  # node -> when each result left
        self.assign_node: dict[str, str] = {}
        self.errors: list[str] = []
        self.hold_s = 0.0

    async def node(self, url: str, slots: int, ready: threading.Event) -> None:
        async with connect(url, max_size=None, ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "node_register", "max_concurrent_jobs": slots}))
            node_id = json.loads(await ws.recv())["node_id"]

            async def beat() -> None:
                while True:
                    await ws.send(json.dumps({"type": "node_heartbeat", "node_id": node_id,
                                              "resource_usage": {"cpu_percent": 1, "mem_percent": 1}}))
                    await asyncio.sleep(0.2)

            async def run(job: str, attempt: int) -> None:
                await ws.send(json.dumps({"type": "job_ack", "job_id": job, "attempt": attempt}))
                if self.hold_s:
                    await asyncio.sleep(self.hold_s)
                self.results_sent[node_id].append(time.time())
                await ws.send(json.dumps({"type": "job_result", "job_id": job, "attempt": attempt,
                                          "success": True, "output": {"ok": True}, "duration_ms": 0}))
            beater = asyncio.create_task(beat())
            running: set[asyncio.Task[None]] = set()
            try:
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame["type"] == "node_status" and frame["status"] == "ready":
                        ready.set()
                    elif frame["type"] == "error":
                        self.errors.append(frame["code"])
                    elif frame["type"] == "job_assign":
                        self.assigned_at.setdefault(frame["job_id"], time.time())
                        self.assign_node[frame["job_id"]] = node_id
                        task = asyncio.create_task(run(frame["job_id"], frame["attempt"]))
                        running.add(task)
                        task.add_done_callback(running.discard)
            except ConnectionClosed:
                pass  # the bench is over and its web process stopping (1012)
            finally:
                beater.cancel()

    def start(self, urls: list[str], count: int, slots: int) -> None:
        events = [threading.Event() for _ in range(count)]

        def main() -> None:
            async def all_nodes() -> None:
                await asyncio.gather(*(self.node(urls[i % len(urls)], slots, e) for i, e in enumerate(events)),
                                     return_exceptions=True)
            asyncio.run(all_nodes())
        threading.Thread(target=main, daemon=True).start()
        for event in events:
            if not event.wait(60):
                raise SystemExit("fake nodes did not become ready")


def send(client: Celery, name: str) -> AsyncResult:
    if name == "bench.noop":
        return client.send_task(name, queue="bench")
    return client.send_task(name, kwargs=JOB)


def burst(client: Celery, name: str, n: int) -> float:
    t0 = time.time()
    results = [send(client, name) for _ in range(n)]
    ResultSet(results).join_native(timeout=600)
    return n / (time.time() - t0)


class ResultWatch:
    """When each task's result was published: the moment a client blocked in get() wakes
    (Celery's Redis backend, and our job scripts, PUBLISH it on the result key's channel)."""

    def __init__(self, url: str) -> None:
        self.at: dict[str, float] = {}
        self._pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe("celery-task-meta-*")
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        try:
            for message in self._pubsub.listen():
                self.at.setdefault(message["channel"].decode().removeprefix("celery-task-meta-"), time.time())
        except redis.ConnectionError:
            pass  # the bench is over: its redis-server stopped


def paced(client: Celery, name: str, rate: float, n: int) -> dict[str, float]:
    """Submit n at ``rate`` a second on a clock (a late submission does not move the next
    ones' times), then wait for them all. Returns when each was submitted."""
    submitted: dict[str, float] = {}
    results: list[AsyncResult] = []
    t0 = time.time()
    for i in range(n):
        delay = t0 + i / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        submitted_at = time.time()
        result = send(client, name)
        submitted[result.id] = submitted_at
        results.append(result)
    ResultSet(results).join_native(timeout=600)
    return submitted


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000, help="jobs (and no-op tasks) in the burst")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--slots", type=int, default=8, help="max_concurrent_jobs of each fake node")
    parser.add_argument("--concurrency", type=int, default=4, help="worker processes (each worker; the no-op's)")
    parser.add_argument("--web", type=int, default=1, help="web processes; the nodes are spread over them")
    parser.add_argument("--workers", type=int, default=1, help="dispatcher workers")
    parser.add_argument("--steady-rate", type=float, default=20.0, help="jobs/s of the steady run")
    parser.add_argument("--paced", type=int, default=300, help="jobs (and tasks) in each steady run")
    parser.add_argument("--hold-ms", type=float, default=1000.0,
                        help="how long a node holds a job in part 3: long enough for every submission to be "
                             "recorded before the first slot frees (else Celery's own queue is measured)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    store = LocalRedis(tmp / "redis", append_only=False).start()
    ports = [free_port() for _ in range(args.web)]
    env = env_for(store.url, ports[0], require_gpu="false", resource_threshold_percent="100",
                  heartbeat_interval_seconds="0.2")
    env["WORKER_CONCURRENCY"] = str(args.concurrency)
    procs = [start([sys.executable, "-m", "gunicorn", "-c", "python:web.gunicorn_conf"], {**env, "PORT": str(port)},
                   tmp / f"web{i}.log") for i, port in enumerate(ports)]
    procs += [start(["bash", "-c", f"exec celery -A dispatcher.celery_app worker --loglevel WARNING "
                                   f"--concurrency {args.concurrency} --hostname bench{i}@%h"], env,
                    tmp / f"worker{i}.log") for i in range(args.workers)]
    procs += [
        start(["bash", "-c", f"exec celery -A dispatcher.celery_app beat --loglevel WARNING "
                             f"--schedule {tmp / 'beat'}"], env, tmp / "beat.log"),
        start(["bash", "-c", f"exec celery -A noop_app worker --loglevel WARNING --concurrency {args.concurrency} "
                             "-Q bench"], {**env, "PYTHONPATH": str(ROOT / "bench")}, tmp / "noop.log"),
    ]
    fleet = Fleet()
    figures: dict[str, Any] = {}
    try:
        for port in ports:
            wait_http(f"http://127.0.0.1:{port}/readyz")
        fleet.start([f"ws://127.0.0.1:{port}/ws/node" for port in ports], args.nodes, args.slots)
        client = Celery(broker=store.url, backend=store.url)
        watch = ResultWatch(store.url)
        for name in ("dispatcher.submit_job", "bench.noop"):  # warm: pools, connections, script cache
            burst(client, name, 50)

        # 1. throughput
        noop_rate = burst(client, "bench.noop", args.jobs)
        job_rate = burst(client, "dispatcher.submit_job", args.jobs)
        figures["throughput"] = {"noop_per_s": round(noop_rate, 1), "jobs_per_s": round(job_rate, 1),
                                 "ratio": round(job_rate / noop_rate, 2)}

        # 2. latency at a steady rate, and at 80% of the burst's
        figures["latency"] = {}
        for label, rate in (("steady", args.steady_rate), ("80% of max", 0.8 * job_rate)):
            noop_sub = paced(client, "bench.noop", rate, args.paced)
            noop_ms = [(watch.at[i] - t) * 1000 for i, t in noop_sub.items()]
            job_sub = paced(client, "dispatcher.submit_job", rate, args.paced)
            job_ms = [(fleet.assigned_at[i] - t) * 1000 for i, t in job_sub.items()]
            figures["latency"][label] = {
                "rate_per_s": round(rate, 1), "noop_round_trip_ms": {"p50": statistics.median(noop_ms),
                                                                     "p99": pct(noop_ms, 0.99)},
                "submit_to_assign_ms": {"p50": statistics.median(job_ms), "p99": pct(job_ms, 0.99)},
                "ratio_p99": round(pct(job_ms, 0.99) / pct(noop_ms, 0.99), 2)}

        # 3. waiting jobs: a freed slot goes to the job waiting for it
        fleet.hold_s = args.hold_ms / 1000
        slots = args.nodes * args.slots
        job_sub = paced(client, "dispatcher.submit_job", 10_000, 2 * slots)
        first_assign = sorted(job_sub, key=lambda i: fleet.assigned_at[i])
        waited = [i for i in first_assign if fleet.assigned_at[i] - job_sub[i] > fleet.hold_s / 2]
        freed_to_assign_ms = []
        for job_id in waited:
            node = fleet.assign_node[job_id]
            freed = [t for t in fleet.results_sent[node] if t <= fleet.assigned_at[job_id]]
            if freed:
                freed_to_assign_ms.append((fleet.assigned_at[job_id] - max(freed)) * 1000)
        fleet.hold_s = 0.0
        figures["waiting"] = {"slots": slots, "jobs": 2 * slots, "waited": len(waited),
                              "freed_to_assign_ms": {"p50": statistics.median(freed_to_assign_ms or [float("nan")]),
                                                     "p99": pct(freed_to_assign_ms, 0.99)}}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
        store.stop()

    print(f"\n{args.jobs} jobs, {args.nodes} nodes x {args.slots} slots, {args.web} web, {args.workers} worker(s) "
          f"of concurrency {args.concurrency} (the no-op worker: the same); logs in {tmp}")
    print(f"error frames received by the nodes: {len(fleet.errors)} {sorted(set(fleet.errors))}\n")
    t = figures["throughput"]
    print(f"throughput, burst of {args.jobs}:")
    print(f"  plain Celery no-op      {t['noop_per_s']:8.1f} tasks/s")
    print(f"  dispatcher jobs         {t['jobs_per_s']:8.1f} jobs/s  ({t['ratio']:.2f}x the no-op)")
    for label, f in figures["latency"].items():
        print(f"latency at {f['rate_per_s']:.0f}/s ({label}), {args.paced} each:")
        print(f"  no-op round trip (send_task -> result)  p50 {f['noop_round_trip_ms']['p50']:7.2f} ms  "
              f"p99 {f['noop_round_trip_ms']['p99']:7.2f} ms")
        print(f"  job submit -> job_assign                p50 {f['submit_to_assign_ms']['p50']:7.2f} ms  "
              f"p99 {f['submit_to_assign_ms']['p99']:7.2f} ms   ({f['ratio_p99']:.2f}x, p99s)")
    w = figures["waiting"]
    print(f"waiting jobs: {w['jobs']} jobs on {w['slots']} slots held {args.hold_ms:.0f} ms; {w['waited']} waited")
    print("  slot freed (result sent) -> next job_assign on that node  "
          + summary(freed_to_assign_ms) if freed_to_assign_ms else "  (none waited)")
    print(json.dumps({"jobs": args.jobs, "nodes": args.nodes, "slots": args.slots, "web": args.web,
                      "workers": args.workers, "concurrency": args.concurrency, **figures,
                      "errors": len(fleet.errors)}))


if __name__ == "__main__":
    main()
