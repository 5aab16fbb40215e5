"""What one job costs, beside a plain Celery no-op task measured in the same run.

    python bench/cost.py [--jobs 300] [--concurrency 2]

Starts a private redis-server, the Procfile's web, worker and beat, a plain
Celery worker for the no-op task (same concurrency) and a few fake nodes
that acknowledge and answer at once. A client with only celery runs N no-op
tasks (send_task + get), then N jobs (dispatcher.submit_job + get), one at a
time, and for each kind reports, per task or job:

- Redis commands (INFO commandstats: those inside scripts count), and Redis
  time (the usec commandstats adds up), with the ceiling one Redis core sets;
- CPU of each process (web, worker, beat; the no-op worker), less what the
  same processes spend idle over as long (heartbeats, the scan);
- a budget by step: every Redis call of one job, captured with MONITOR and
  put under the step that made it (submit, dispatch, deliver, ack, result,
  completion, publish).

The last line is one JSON object with every figure and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import psutil
import redis
from celery import Celery
from celery.result import ResultSet
from websockets.asyncio.client import connect

from common import ROOT, LocalRedis, env_for, free_port, start, wait_http

sys.path.insert(0, str(ROOT))
from dispatcher.scripts import script_sources

#: Heartbeats every 5 s: the nodes' own traffic stays small beside the jobs'.
NODE_SETTINGS = {"require_gpu": "false", "resource_threshold_percent": "100", "heartbeat_interval_seconds": "5",
                 "heartbeat_timeout_seconds": "30"}


async def fake_node(url: str, ready: threading.Event) -> None:
    """Registers, becomes ready, then acks and answers every job at once."""
    async with connect(url, max_size=None, ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "node_register", "max_concurrent_jobs": 4}))
        node_id = json.loads(await ws.recv())["node_id"]

        async def beat() -> None:
            for i in range(10**9):
                await ws.send(json.dumps({"type": "node_heartbeat", "node_id": node_id,
                                          "resource_usage": {"cpu_percent": 1, "mem_percent": 1}}))
                await asyncio.sleep(0.05 if i < 3 else 5)
        beater = asyncio.create_task(beat())
        try:
            async for raw in ws:
                frame = json.loads(raw)
                if frame["type"] == "node_status" and frame["status"] == "ready":
                    ready.set()
                elif frame["type"] == "job_assign":
                    job, attempt = frame["job_id"], frame["attempt"]
                    await ws.send(json.dumps({"type": "job_ack", "job_id": job, "attempt": attempt}))
                    await ws.send(json.dumps({"type": "job_result", "job_id": job, "attempt": attempt,
                                              "success": True, "output": {"ok": True}, "duration_ms": 0}))
        except Exception:  # noqa: BLE001 - the bench is over
            pass
        finally:
            beater.cancel()


def run_nodes(url: str, count: int) -> None:
    events = [threading.Event() for _ in range(count)]

    def main() -> None:
        async def all_nodes() -> None:
            await asyncio.gather(*(fake_node(url, e) for e in events))
        asyncio.run(all_nodes())
    threading.Thread(target=main, daemon=True).start()
    for event in events:
        if not event.wait(60):
            raise SystemExit("fake nodes did not become ready")


def tree_cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of a process and its children (a prefork worker's pool, gunicorn's worker)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def commandstats(client: redis.Redis) -> tuple[Counter[str], Counter[str]]:
    """Calls and time (usec) by command name. A script's EVALSHA time includes the commands it
    runs, which commandstats also counts under their own names (see ``redis_usec``)."""
    calls: Counter[str] = Counter()
    usec_by: Counter[str] = Counter()
    for name, stats in client.info("commandstats").items():
        calls[name.removeprefix("cmdstat_")] += stats["calls"]
        usec_by[name.removeprefix("cmdstat_")] += stats["usec"]
    for internal in ("config|resetstat", "info"):
        calls.pop(internal, None)
        usec_by.pop(internal, None)
    return calls, usec_by


def redis_cpu_s(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def redis_usec(kind: dict[str, Any], inner_per_job: Counter[str]) -> float:
    """Redis time per task with each command counted once: commandstats less the share of
    each command's time that ran inside scripts (counted in EVALSHA already)."""
    total = sum(kind["usec_by_command"].values())
    for command, inner in inner_per_job.items():
        calls = kind["by_command"].get(command, 0)
        if calls:
            total -= kind["usec_by_command"].get(command, 0) * min(1.0, inner / calls)
    return total


def script_usec(client: redis.Redis) -> Counter[str]:
    """Redis time (usec) by script, from the slow log (set to record every command)."""
    names = {hashlib.sha1(src.encode()).hexdigest(): name for name, src in script_sources().items()}
    usec: Counter[str] = Counter()
    for entry in client.slowlog_get(1 << 30):
        command = entry["command"]
        command = command.decode(errors="replace") if isinstance(command, bytes) else command
        if command.upper().startswith("EVALSHA "):
            usec[names.get(command.split(" ", 2)[1], "other script")] += entry["duration"]
    return usec


def run_kind(app: Celery, name: str, n: int, kwargs: dict[str, Any] | None, burst: bool = False) -> None:
    """Send n tasks one at a time (each waits for the last), or all at once (Redis busy, as
    near its ceiling)."""
    queue = "bench" if name == "bench.noop" else None
    if burst:
        ResultSet([app.send_task(name, kwargs=kwargs, queue=queue) for _ in range(n)]).join_native(timeout=300)
        return
    for _ in range(n):
        app.send_task(name, kwargs=kwargs, queue=queue).get(timeout=30)


def measure(app: Celery, client: redis.Redis, procs: dict[str, psutil.Process], name: str, n: int,
            kwargs: dict[str, Any] | None, burst: bool) -> dict[str, Any]:
    """Commands, Redis time and CPU per task, less the same processes' idle CPU over as long."""
    cpu0 = {k: tree_cpu_s(p) for k, p in procs.items()}
    redis0 = redis_cpu_s(client)
    client.config_resetstat()
    t0 = time.monotonic()
    run_kind(app, name, n, kwargs, burst)
    elapsed_s = time.monotonic() - t0
    calls, usec_by = commandstats(client)
    cpu1 = {k: tree_cpu_s(p) for k, p in procs.items()}
    redis1 = redis_cpu_s(client)
    # Time by script from the slow log set to keep every command, in a run of its own: it
    # records each command a script runs too, which costs Redis time of its own.
    client.config_set("slowlog-log-slower-than", 0)
    client.config_set("slowlog-max-len", 200 * n)
    client.slowlog_reset()
    run_kind(app, name, min(n, 200), kwargs, burst)
    by_script = script_usec(client)
    client.config_set("slowlog-log-slower-than", 10000)
    by_script = Counter({name: usec * n / min(n, 200) for name, usec in by_script.items()})
    time.sleep(elapsed_s)  # the same processes, idle, for as long
    idle = {k: tree_cpu_s(p) - cpu1[k] for k, p in procs.items()}
    redis_idle = redis_cpu_s(client) - redis1
    cpu_ms = {k: max(0.0, (cpu1[k] - cpu0[k] - idle[k]) * 1000 / n) for k in procs}
    return {"commands": sum(calls.values()) / n, "by_command": {c: v / n for c, v in calls.most_common()},
            "usec_by_command": {c: v / n for c, v in usec_by.most_common()},
            "usec_by_script": {c: round(v / n, 1) for c, v in by_script.most_common()},
            "redis_cpu_usec": max(0.0, (redis1 - redis0 - redis_idle) * 1e6 / n),
            "cpu_ms": {k: round(v, 3) for k, v in cpu_ms.items()},
            "cpu_ms_total": round(sum(cpu_ms.values()), 3), "seconds": round(elapsed_s, 2)}


# --- one job under MONITOR ------------------------------------------------------------------

#: Which step each of our scripts belongs to.
SCRIPT_STEPS = {
    "dispatch_job": "dispatch", "submit_job": "submit + dispatch",
    "pop_frames": "deliver", "ack_job": "ack", "complete_job": "completion",
}
#: Our calls outside scripts: the web process hands a result on (XADD), a worker reads and
#: acknowledges results in batches (one XREADGROUP and XACK for up to 200 under load); task
#: events for Flower are PUBLISHes of their own.
COMMAND_STEPS = {"XADD": "result", "PUBLISH": "publish (task events)",
                 "XREADGROUP": "completion (batched)", "XACK": "completion (batched)"}
_MONITOR_LINE = re.compile(r'^(?P<ts>[\d.]+) \[(?P<db>\d+) (?P<who>[^\]]+)\] (?P<args>.*)$')


def monitor_one_job(url: str, app: Celery, sha_names: dict[str, str]) -> list[tuple[str, str, str]]:
    """(who, caller, command) of every Redis command one job makes, in order: who is the
    client address (or "lua"), caller the script a Lua command runs in."""
    monitor_client = redis.Redis.from_url(url, decode_responses=True)
    lines: list[str] = []
    stop = threading.Event()

    def listen() -> None:
        with monitor_client.monitor() as m:
            for command in m.listen():
                lines.append(f"{command['time']} [{command['db']} {command['client_address'] or 'lua'}"
                             f"{':' + str(command['client_port']) if command['client_port'] else ''}] "
                             f"{command['command']}")
                if stop.is_set() and "bench-monitor-end" in command["command"]:
                    return
    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    time.sleep(0.5)
    job = app.send_task("dispatcher.submit_job", kwargs={"job_type": "bench", "payload": {"n": 1}})
    job.get(timeout=30)
    time.sleep(0.5)  # what follows the result (a late ack, a kick) belongs to the job too
    stop.set()
    redis.Redis.from_url(url).get("bench-monitor-end")
    thread.join(10)
    out: list[tuple[str, str, str]] = []
    caller = "-"
    for line in lines:
        m = _MONITOR_LINE.match(line)
        if not m:
            continue
        command = m["args"].split(" ", 1)[0].strip('"').upper()
        who = m["who"]
        if command in ("EVALSHA", "EVAL"):
            sha = m["args"].split(" ", 2)[1].strip('"')
            caller = sha_names.get(sha, sha[:8])
        if command in ("MONITOR", "GET") and "bench-monitor-end" in m["args"]:
            continue
        out.append((who, caller if who == "lua" or command in ("EVALSHA", "EVAL") else "-", command))
    return out


def budget(commands: list[tuple[str, str, str]], names: dict[str, str]) -> dict[str, Counter[str]]:
    """Commands of one job by step. Our scripts say their step; the rest is Celery's own work,
    put under the process that made it."""
    steps: dict[str, Counter[str]] = defaultdict(Counter)
    for who, caller, command in commands:
        if caller != "-":
            step = SCRIPT_STEPS.get(caller, caller)
            steps[step][f"{command} ({caller})" if command in ("EVALSHA", "EVAL") else command] += 1
        elif command in COMMAND_STEPS:
            steps[COMMAND_STEPS[command]][command] += 1
        else:
            steps[f"celery: {names.get(who.rsplit(':', 1)[0] + ':' + who.rsplit(':', 1)[1], who)}"][command] += 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes (both workers)")
    parser.add_argument("--burst", action="store_true",
                        help="send each kind's tasks all at once instead of one at a time: Redis busy, "
                             "as it is near the ceiling this prints")
    parser.add_argument("--no-pin", action="store_true",
                        help="leave redis-server on any core (by default it gets core 0 to itself and "
                             "every other process of the bench shares the rest)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cost-"))
    store = LocalRedis(tmp / "redis", append_only=False).start()
    cores = sorted(os.sched_getaffinity(0))
    pinned = not args.no_pin and len(cores) >= 2
    if pinned:
        assert store.process is not None  # start() made it
        # Redis time is what one Redis core spends per job: on a 2-core machine the Python
        # processes would otherwise take turns on Redis's core and inflate it (both kinds alike).
        os.sched_setaffinity(store.process.pid, {cores[0]})
        os.sched_setaffinity(0, set(cores[1:]))  # the processes started below inherit it
    port = free_port()
    env = env_for(store.url, port, **NODE_SETTINGS)
    env["WORKER_CONCURRENCY"] = str(args.concurrency)
    popen = {
        "web": start([sys.executable, "-m", "gunicorn", "-c", "python:web.gunicorn_conf"], env, tmp / "web.log"),
        "worker": start(["bash", "-c", f"exec celery -A dispatcher.celery_app worker --loglevel WARNING "
                                       f"--concurrency {args.concurrency}"], env, tmp / "worker.log"),
        "beat": start(["bash", "-c", f"exec celery -A dispatcher.celery_app beat --loglevel WARNING "
                                     f"--schedule {tmp / 'beat'}"], env, tmp / "beat.log"),
        "noop worker": start(["bash", "-c", f"exec celery -A noop_app worker --loglevel WARNING "
                                            f"--concurrency {args.concurrency} -Q bench"],
                             {**env, "PYTHONPATH": str(ROOT / "bench")}, tmp / "noop.log"),
    }
    client = redis.Redis.from_url(store.url, decode_responses=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz")
        run_nodes(f"ws://127.0.0.1:{port}/ws/node", args.nodes)
        app = Celery(broker=store.url, backend=store.url)
        job = {"job_type": "bench", "payload": {"n": 1}}
        run_kind(app, "dispatcher.submit_job", 50, job)  # warm: pools, connections, script cache
        run_kind(app, "bench.noop", 50, None)
        procs = {k: psutil.Process(p.pid) for k, p in popen.items()}
        noop = measure(app, client, {"noop worker": procs["noop worker"]}, "bench.noop", args.jobs, None,
                       args.burst)
        jobs = measure(app, client, {k: procs[k] for k in ("web", "worker", "beat")}, "dispatcher.submit_job",
                       args.jobs, job, args.burst)
        sha_names = {hashlib.sha1(src.encode()).hexdigest(): name
                     for name, src in script_sources().items()}
        names = {f"{c['addr']}": c.get("name") or "client" for c in client.client_list()}
        monitored = monitor_one_job(store.url, app, sha_names)
        one_job = budget(monitored, names)
        inner = Counter(command.lower() for who, _, command in monitored if who == "lua")
        noop["redis_usec"] = redis_usec(noop, Counter())
        jobs["redis_usec"] = redis_usec(jobs, inner)
    finally:
        for proc in popen.values():
            proc.terminate()
        for proc in popen.values():
            proc.wait(20)
        store.stop()

    ratio_commands = jobs["commands"] / noop["commands"]
    ratio_usec = jobs["redis_usec"] / noop["redis_usec"]
    noop_cpu = noop["cpu_ms"]["noop worker"]
    ratio_cpu = jobs["cpu_ms_total"] / noop_cpu if noop_cpu else float("nan")
    ceiling = 1e6 / jobs["redis_usec"]
    print(f"\n{args.jobs} of each, {'all at once' if args.burst else 'one at a time'}; "
          f"worker concurrency {args.concurrency}; "
          f"redis-server {'alone on core ' + str(cores[0]) if pinned else 'not pinned'}; logs in {tmp}\n")
    print(f"{'per task or job':38s} {'no-op task':>12s} {'job':>12s} {'ratio':>7s}")
    print(f"{'Redis commands (scripts included)':38s} {noop['commands']:12.1f} {jobs['commands']:12.1f} "
          f"{ratio_commands:6.2f}x")
    print(f"{'Redis time (usec, commandstats)':38s} {noop['redis_usec']:12.1f} {jobs['redis_usec']:12.1f} "
          f"{ratio_usec:6.2f}x")
    ratio_redis_cpu = jobs["redis_cpu_usec"] / noop["redis_cpu_usec"] if noop["redis_cpu_usec"] else float("nan")
    print(f"{'Redis server CPU (usec, INFO cpu)':38s} {noop['redis_cpu_usec']:12.1f} {jobs['redis_cpu_usec']:12.1f} "
          f"{ratio_redis_cpu:6.2f}x")
    print(f"{'CPU, all processes (ms)':38s} {noop_cpu:12.3f} {jobs['cpu_ms_total']:12.3f} {ratio_cpu:6.2f}x")
    for name, ms in jobs["cpu_ms"].items():
        print(f"  {name:36s} {'':12s} {ms:12.3f}")
    print(f"\nOne Redis core carries at most {ceiling:,.0f} jobs/s (1 s / Redis time per job); "
          f"{1e6 / noop['redis_usec']:,.0f} no-op tasks/s.")
    print("\nOne job's Redis calls by step (MONITOR):")
    for step, counter in sorted(one_job.items(), key=lambda kv: -sum(kv[1].values())):
        print(f"  {step:40s} {sum(counter.values()):4d}  " + ", ".join(f"{c} {n}" for c, n in counter.most_common()))
    print("\nCommands per job by name: " + ", ".join(f"{c} {n:.2f}" for c, n in list(jobs["by_command"].items())[:20]))
    print("Redis usec per job by command (EVALSHA with what its script runs): " + ", ".join(
        f"{c} {n:.1f}" for c, n in list(jobs["usec_by_command"].items())[:12]))
    print("Redis usec per job by script: " + ", ".join(f"{c} {n:.1f}" for c, n in jobs["usec_by_script"].items()))
    print(json.dumps({
        "jobs": args.jobs, "burst": args.burst, "concurrency": args.concurrency, "redis_pinned": pinned,
        "noop": noop, "job": jobs,
        "ratio_commands": round(ratio_commands, 2), "ratio_redis_time": round(ratio_usec, 2),
        "ratio_redis_cpu": round(ratio_redis_cpu, 2),
        "ratio_cpu": round(ratio_cpu, 2), "redis_ceiling_jobs_per_s": round(ceiling),
        "one_job_by_step": {k: dict(v) for k, v in one_job.items()},
    }))


if __name__ == "__main__":
    main()
