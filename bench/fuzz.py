"""Fuzz the node protocol: 100,000 frames against a real web process.

    python bench/fuzz.py [--frames 100000] [--sessions 8] [--seed 1]

Starts a private redis-server and the web process (the Procfile's command, with
the rate limit lifted so that every frame is parsed), registers an honest node
that holds a job, then runs fuzzing sessions in parallel, registered and not,
each sending a batch of frames from tests/fuzzing.py (malformed, truncated,
oversized, wrongly typed, out of order, for other nodes and their jobs) and
reading what comes back. It reports the frames sent, the answers by code, the
close codes, and every finding: an answer outside the contract, a crash in the
log, the honest node or its job disturbed, a record that disagrees with its
indexes. Exit status 1 on any finding. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from common import ROOT, LocalRedis, env_for, free_port, start, wait_http

sys.path.insert(0, str(ROOT))
from celery import Celery

from dispatcher.jobs import Jobs
from dispatcher.keys import Keys
from dispatcher.settings import load_settings
from tests.fuzzing import Targets, check_answer, check_log, check_records, random_frame

#: Frames per session; sessions end with a short quiet read.
BATCH = 100


async def honest_node(url: str) -> tuple[object, str]:
    ws = await connect(url, max_size=None, ping_interval=None)
    await ws.send(json.dumps({"type": "node_register", "max_concurrent_jobs": 2,
                              "installed_models": [{"model_id": "whisper", "status": "ready"}]}))
    ack = json.loads(await ws.recv())
    for _ in range(3):
        await ws.send(json.dumps({"type": "node_heartbeat", "resource_usage": {"cpu_percent": 1},
                                  "installed_models": [{"model_id": "whisper", "status": "ready"}]}))
    return ws, ack["node_id"]


async def fuzz_session(url: str, rng: random.Random, targets: Targets, tally: Counter[str],
                       findings: list[str]) -> int:
    """One session: maybe register, send a batch, read until quiet. Returns frames sent."""
    sent = 0
    async with connect(url, max_size=None, ping_interval=None, open_timeout=30) as ws:
        own_id = None
        if rng.random() < 0.5:
            await ws.send('{"type": "node_register"}')
            own_id = json.loads(await ws.recv())["node_id"]
        try:
            for _ in range(BATCH):
                await ws.send(random_frame(rng, own_id, targets))
                sent += 1
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 0.2))
                tally[f"{frame['type']} {frame.get('code', '')}".strip()] += 1
                if (problem := check_answer(frame)) is not None:
                    findings.append(problem)
        except TimeoutError:
            tally["session open at the end"] += 1
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
            tally[f"closed {code}"] += 1
            if code not in (1008, 1009):
                findings.append(f"session closed with {code}")
    return sent


async def run(url: str, frames: int, parallel: int, seed: int, targets: Targets) -> tuple[int, Counter[str],
                                                                                           list[str]]:
    tally: Counter[str] = Counter()
    findings: list[str] = []
    rngs = [random.Random(seed * 1000 + i) for i in range(parallel)]
    sent = 0

    async def worker(rng: random.Random) -> None:
        nonlocal sent
        while sent < frames:
            done = await fuzz_session(url, rng, targets, tally, findings)
            sent += done  # after the await: workers interleave only there
    await asyncio.gather(*(worker(rng) for rng in rngs))
    return sent, tally, findings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=16, help="fuzzing sessions at once")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fuzz-"))
    store = LocalRedis(tmp / "redis", append_only=False).start()
    port = free_port()
    env = env_for(store.url, port, require_gpu="false", required_models='["whisper"]',
                  max_messages_per_second="1000000", max_unregistered_sessions_per_address="1000")
    web = start([sys.executable, "-m", "gunicorn", "-c", "python:web.gunicorn_conf"], env, tmp / "web.log")
    client = redis.Redis.from_url(store.url, decode_responses=True)
    keys = Keys()
    url = f"ws://127.0.0.1:{port}/ws/node"
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz")

        async def everything() -> tuple[int, Counter[str], list[str], str, float]:
            ws, node_id = await honest_node(url)
            deadline = time.monotonic() + 10
            while client.hget(keys.node(node_id), "status") != "ready" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            settings = load_settings(redis_url=store.url, require_gpu=False, required_models=["whisper"])
            Jobs(client, settings, Celery(broker=store.url, backend=store.url)).submit(
                "honest-job", {"job_type": "asr", "required_models": ["whisper"]})
            targets = Targets(node_ids=[node_id], jobs=[("honest-job", 1)])
            started = time.monotonic()
            sent, tally, findings = await run(url, args.frames, args.sessions, args.seed, targets)
            elapsed = time.monotonic() - started
            await ws.close()  # type: ignore[attr-defined]
            return sent, tally, findings, node_id, elapsed
        sent, tally, findings, node_id, elapsed = asyncio.run(everything())
        time.sleep(1)
        if client.hmget(keys.job("honest-job"), "state", "node_id") != ["assigned", node_id]:
            findings.append("the honest node's job was disturbed")
        findings += [f"record: {p}" for p in check_records(client, keys)]
        findings += [f"log: {line}" for line in check_log((tmp / "web.log").read_text(errors="replace"))]
        if web.poll() is not None:
            findings.append("the web process died")
    finally:
        web.terminate()
        web.wait(20)
        store.stop()

    print(f"\n{sent} frames in {elapsed:.1f} s ({sent / elapsed:.0f}/s), seed {args.seed}, "
          f"{args.sessions} sessions at once; web log in {tmp / 'web.log'}\n")
    print("answers and closes:")
    for what, count in tally.most_common():
        print(f"  {count:8d}  {what}")
    distinct = sorted(set(findings))
    print(f"\nfindings: {len(findings)} ({len(distinct)} distinct)")
    for finding in distinct[:30]:
        print(f"  {finding}")
    print(json.dumps({"frames": sent, "seconds": round(elapsed, 1), "frames_per_s": round(sent / elapsed),
                      "seed": args.seed, "answers": dict(tally), "findings": len(findings),
                      "distinct_findings": distinct[:30]}))
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
