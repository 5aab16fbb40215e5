"""Jobs end to end, beside plain Celery, in one run.

    python bench/jobs.py --jobs 1000 --nodes 8

Starts a private redis-server, the web process and a worker (the Procfile's
commands) and N in-process fake nodes that acknowledge and answer at once.
A client with only celery submits jobs (dispatcher.submit_job) in a burst,
then one at a time. It reports jobs per second (first submit to last result)
and submit -> job_assign latency (p50/p99). The baseline is a plain Celery
no-op task on the same broker and backend, run by a worker with the same
concurrency: jobs per second and submit -> task start.
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
from pathlib import Path

from celery import Celery
from celery.result import ResultSet
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from common import ROOT, LocalRedis, env_for, free_port, start, summary, wait_http

assigned_at: dict[str, float] = {}
errors_seen: list[str] = []


async def fake_node(url: str, slots: int, ready: threading.Event, stop: asyncio.Event) -> None:
    async with connect(url, max_size=None, ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "node_register", "max_concurrent_jobs": slots}))
        node_id = json.loads(await ws.recv())["node_id"]

        async def beat() -> None:
            while not stop.is_set():
                await ws.send(json.dumps({"type": "node_heartbeat", "node_id": node_id,
                                          "resource_usage": {"cpu_percent": 1, "mem_percent": 1}}))
                await asyncio.sleep(0.2)
        beater = asyncio.create_task(beat())
        try:
            async for raw in ws:
                frame = json.loads(raw)
                if frame["type"] == "node_status" and frame["status"] == "ready":
                    ready.set()
                elif frame["type"] == "error":
                    errors_seen.append(frame["code"])
                elif frame["type"] == "job_assign":
                    assigned_at.setdefault(frame["job_id"], time.time())
                    job, attempt = frame["job_id"], frame["attempt"]
                    await ws.send(json.dumps({"type": "job_ack", "job_id": job, "attempt": attempt}))
                    await ws.send(json.dumps({"type": "job_result", "job_id": job, "attempt": attempt,
                                              "success": True, "output": {"ok": True}, "duration_ms": 0}))
        except ConnectionClosed:
            pass  # the bench is over and its web process stopping (1012)
        finally:
            beater.cancel()


def run_nodes(url: str, count: int, slots: int) -> threading.Event:
    everyone_ready = threading.Event()

    def main() -> None:
        async def all_nodes() -> None:
            stop = asyncio.Event()
            events = [threading.Event() for _ in range(count)]
            tasks = [asyncio.create_task(fake_node(url, slots, e, stop)) for e in events]
            while not all(e.is_set() for e in events):
                await asyncio.sleep(0.05)
            everyone_ready.set()
            await asyncio.gather(*tasks)
        asyncio.run(all_nodes())
    threading.Thread(target=main, daemon=True).start()
    return everyone_ready


def burst(client: Celery, name: str, n: int, kwargs: dict | None) -> tuple[float, dict[str, float], list]:
    submitted: dict[str, float] = {}
    results = []
    t0 = time.time()
    for _ in range(n):
        submitted_at = time.time()
        result = client.send_task(name, kwargs=kwargs, queue="bench" if name == "bench.noop" else None)
        submitted[result.id] = submitted_at
        results.append(result)
    values = ResultSet(results).join_native(timeout=600)
    return n / (time.time() - t0), submitted, values


def one_at_a_time(client: Celery, name: str, n: int, kwargs: dict | None) -> tuple[dict[str, float], list]:
    submitted, values = {}, []
    for _ in range(n):
        submitted_at = time.time()
        result = client.send_task(name, kwargs=kwargs, queue="bench" if name == "bench.noop" else None)
        submitted[result.id] = submitted_at
        values.append(result.get(timeout=60))
    return submitted, values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--slots", type=int, default=8, help="max_concurrent_jobs of each fake node")
    parser.add_argument("--concurrency", type=int, default=4, help="worker processes (both workers)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    store = LocalRedis(tmp / "redis", append_only=False).start()
    port = free_port()
    env = env_for(store.url, port, require_gpu="false", resource_threshold_percent="100",
                  heartbeat_interval_seconds="0.2")
    env["WORKER_CONCURRENCY"] = str(args.concurrency)
    procs = [
        start([sys.executable, "-m", "gunicorn", "-c", "python:web.gunicorn_conf"], env, tmp / "web.log"),
        start(["bash", "-c", f"exec celery -A dispatcher.celery_app worker --loglevel WARNING "
                             f"--concurrency {args.concurrency} -Q celery"], env, tmp / "worker.log"),
        start(["bash", "-c", f"exec celery -A noop_app worker --loglevel INFO --concurrency {args.concurrency} "
                             "-Q bench"], {**env, "PYTHONPATH": str(ROOT / "bench")}, tmp / "noop.log"),
    ]
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz")
        if not run_nodes(f"ws://127.0.0.1:{port}/ws/node", args.nodes, args.slots).wait(60):
            raise SystemExit("fake nodes did not become ready")
        client = Celery(broker=store.url, backend=store.url)
        job = {"job_type": "bench", "payload": {"n": 1}}
        # warm both paths (worker pools, connections, script cache)
        one_at_a_time(client, "dispatcher.submit_job", 20, job)
        one_at_a_time(client, "bench.noop", 20, None)

        noop_rate, noop_sub, noop_starts = burst(client, "bench.noop", args.jobs, None)
        noop_burst_ms = [(started - noop_sub[i]) * 1000 for i, started in zip(noop_sub, noop_starts)]
        job_rate, job_sub, outputs = burst(client, "dispatcher.submit_job", args.jobs, job)
        assert all(o == {"ok": True} for o in outputs)
        job_burst_ms = [(assigned_at[i] - t) * 1000 for i, t in job_sub.items()]

        paced = min(300, args.jobs)
        noop_sub1, noop_starts1 = one_at_a_time(client, "bench.noop", paced, None)
        noop_one_ms = [(s - noop_sub1[i]) * 1000 for i, s in zip(noop_sub1, noop_starts1)]
        job_sub1, _ = one_at_a_time(client, "dispatcher.submit_job", paced, job)
        job_one_ms = [(assigned_at[i] - t) * 1000 for i, t in job_sub1.items()]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
        store.stop()

    print(f"\n{args.jobs} jobs, {args.nodes} nodes x {args.slots} slots, worker concurrency {args.concurrency}")
    print(f"error frames received by the nodes: {len(errors_seen)} {sorted(set(errors_seen))}\n")
    print(f"throughput, burst of {args.jobs}:")
    print(f"  plain Celery no-op      {noop_rate:8.1f} tasks/s")
    print(f"  dispatcher jobs         {job_rate:8.1f} jobs/s  ({job_rate / noop_rate:.2f}x the no-op)")
    print("latency, burst (queueing included):")
    print(f"  no-op submit -> start      {summary(noop_burst_ms)}")
    print(f"  job submit -> job_assign   {summary(job_burst_ms)}")
    print(f"latency, one at a time ({paced} each):")
    print(f"  no-op submit -> start      {summary(noop_one_ms)}")
    print(f"  job submit -> job_assign   {summary(job_one_ms)}")
    print(f"  ratio of medians           {statistics.median(job_one_ms) / statistics.median(noop_one_ms):.2f}x")


if __name__ == "__main__":
    main()
