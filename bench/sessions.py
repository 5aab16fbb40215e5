"""How many node sessions one gevent web process holds, and what a heartbeat costs.

    python bench/sessions.py --sessions 2000

Against one gunicorn gevent worker it opens N node sessions, registers them,
sends three heartbeat rounds (the third turns every node ready) and times,
per session, the third heartbeat -> its node_status frame: the whole journey
(frame, Lua, node queue, pub/sub wake-up, pop, send). The baseline is a
flask-sock echo under the same gunicorn settings: N sessions, one round trip
each. It reports the web process's Redis connections and memory too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import tempfile
import time
from pathlib import Path

import psutil
import redis
from websockets.asyncio.client import connect

from common import ROOT, LocalRedis, env_for, free_port, start, summary, wait_http

GUNICORN = ["-m", "gunicorn", "-c", "python:web.gunicorn_conf"]


async def open_all(url: str, n: int, concurrency: int = 200) -> list:
    gate = asyncio.Semaphore(concurrency)

    async def one():
        async with gate:
            return await connect(url, max_size=None, open_timeout=60, ping_interval=None, compression=None)
    return await asyncio.gather(*(one() for _ in range(n)))


PACED_RATE = 300  # frames a second across the fleet: 2,000 nodes heartbeating every 6.7 s


async def echo_rounds(conns: list) -> dict[str, list[float]]:
    async def one(ws, start_s=0.0):
        await asyncio.sleep(start_s)
        t0 = time.perf_counter()
        await ws.send('{"type":"ping"}')
        await ws.recv()
        return (time.perf_counter() - t0) * 1000
    burst = await asyncio.gather(*(one(ws) for ws in conns))
    paced = await asyncio.gather(*(one(ws, k / PACED_RATE) for k, ws in enumerate(conns)))
    return {"round trip (burst)": burst, f"round trip (paced {PACED_RATE}/s)": paced}


def heartbeat(node_id: str, model_status: str = "ready") -> str:
    return json.dumps({"type": "node_heartbeat", "node_id": node_id, "timestamp": int(time.time() * 1000),
                       "resource_usage": {"cpu_percent": 5, "gpu_percent": 1, "mem_percent": 10, "running_jobs": 0},
                       "installed_models": [{"model_id": "m", "status": model_status}]})


async def dispatcher_rounds(conns: list) -> dict[str, list[float]]:
    async def register(ws):
        t0 = time.perf_counter()
        await ws.send('{"type":"node_register","max_concurrent_jobs":2}')
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "node_register_ack":
                return frame["node_id"], (time.perf_counter() - t0) * 1000

    registered = await asyncio.gather(*(register(ws) for ws in conns))
    ids = [node_id for node_id, _ in registered]

    async def drain_until(ws, wanted):
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "node_status" and frame["status"] == wanted:
                return

    await asyncio.gather(*(drain_until(ws, "registering") for ws in conns))
    for _ in range(2):
        await asyncio.gather(*(ws.send(heartbeat(i)) for ws, i in zip(conns, ids)))
    await asyncio.sleep(1.0)

    async def third(ws, node_id):
        t0 = time.perf_counter()
        await ws.send(heartbeat(node_id))
        await drain_until(ws, "ready")
        return (time.perf_counter() - t0) * 1000
    ready_ms = await asyncio.gather(*(third(ws, i) for ws, i in zip(conns, ids)))

    # Paced: every node fails three checks in a row, the whole fleet at `rate` heartbeats
    # a second; the third one's node_status (degraded) is timed, as in steady operation.
    async def failing(ws, node_id, start_s):
        await asyncio.sleep(start_s)
        for _ in range(2):
            await ws.send(heartbeat(node_id, "error"))
            await asyncio.sleep(spacing_s)
        t0 = time.perf_counter()
        await ws.send(heartbeat(node_id, "error"))
        await drain_until(ws, "degraded")
        return (time.perf_counter() - t0) * 1000
    rate = PACED_RATE
    spacing_s = len(conns) / rate  # node k starts at k / rate: the fleet sends `rate` a second
    paced_ms = await asyncio.gather(*(failing(ws, i, k / rate) for k, (ws, i) in enumerate(zip(conns, ids))))
    return {"register (burst)": [ms for _, ms in registered], "heartbeat->status (burst)": ready_ms,
            f"heartbeat->status (paced {rate}/s)": paced_ms}


def worker_of(master: int) -> psutil.Process:
    children = psutil.Process(master).children()
    return children[0]


def web_redis_clients(client: redis.Redis, worker_pid: int) -> int:
    return sum(1 for c in client.client_list() if c.get("name") == f"dispatcher-{worker_pid}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a dispatcher setting for the web process (repeatable)")
    args = parser.parse_args()
    extra_settings = dict(kv.split("=", 1) for kv in args.set)
    n = args.sessions
    tmp = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    store = LocalRedis(tmp / "redis", append_only=False).start()
    client = redis.Redis.from_url(store.url, decode_responses=True)
    results = {}
    try:
        for name, app in (("echo baseline", "bench.echo_app:app"), ("dispatcher", None)):
            port = free_port()
            settings = {"web_worker_connections": str(n + 500), "require_gpu": "false", "required_models": '["m"]',
                        "max_messages_per_second": "100", **extra_settings}
            env = env_for(store.url, port, **settings)
            extra = ["--pythonpath", str(ROOT), app] if app else []
            proc = start([__import__("sys").executable, *GUNICORN, *extra], env, tmp / f"{name}.log")
            try:
                wait_http(f"http://127.0.0.1:{port}/healthz")
                url = f"ws://127.0.0.1:{port}/ws/node"
                t0 = time.perf_counter()
                conns = await open_all(url, n)
                open_s = time.perf_counter() - t0
                worker = worker_of(proc.pid)
                if app:
                    rounds = await echo_rounds(conns)
                else:
                    rounds = await dispatcher_rounds(conns)
                rss_mb = worker.memory_info().rss / 2**20
                redis_conns = web_redis_clients(client, worker.pid) if not app else 0
                results[name] = (open_s, rounds, rss_mb, redis_conns)
                await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
    finally:
        store.stop()

    print(f"\n{n} sessions on one gunicorn gevent worker ({psutil.cpu_count()} cores)\n")
    for name, (open_s, rounds, rss_mb, redis_conns) in results.items():
        print(f"{name}: opened all in {open_s:.2f} s, worker RSS {rss_mb:.0f} MiB"
              + (f", Redis connections held by the worker: {redis_conns}" if name == "dispatcher" else ""))
        for label, values in rounds.items():
            print(f"  {label:20s} {summary(values)}")
    import statistics
    pauses = [json.loads(line)["pause_ms"] for line in (tmp / "dispatcher.log").read_text().splitlines()
              if '"event": "gc_pause"' in line]
    if pauses:
        print(f"dispatcher worker: {len(pauses)} garbage collections paused it >= 100 ms "
              f"(median {statistics.median(pauses):.0f} ms, longest {max(pauses)} ms)")
    echo = results["echo baseline"][1]
    mine = results["dispatcher"][1]
    for kind in ("burst", f"paced {PACED_RATE}/s"):
        ratio = statistics.median(mine[f"heartbeat->status ({kind})"]) / statistics.median(echo[f"round trip ({kind})"])
        print(f"heartbeat -> node_status / echo round trip, {kind}: {ratio:.1f}x (medians)")


if __name__ == "__main__":
    asyncio.run(main())
