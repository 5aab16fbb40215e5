"""Chaos: every job ends exactly once while processes are SIGKILLed around it.

    python bench/chaos.py --jobs 5000 --nodes 50 --seed 1 --minutes 2

Starts a private redis-server (AOF, fsync always: a SIGKILL loses nothing),
the Procfile's processes (web x2 with the nodes split between them, worker x2,
beat x2: two beats running by mistake must break nothing) and N reference node
agents (real processes, max 2 jobs each, handler bench/chaos_handler.py). A
small supervisor restarts whatever dies, as a platform restarts a crashed dyno.

A client submits the jobs at a steady rate over --minutes while a killer, on a
seeded schedule, SIGKILLs each web process and each worker once, 10% of the
nodes (back 1-4 s later with the same state file, so they resume) and Redis
once (back ~2 s later on the same port, from the same AOF).

Then it waits (bounded) for every job to end and checks, from a fresh client's
get() and from the dispatcher's records in Redis, that no job was lost, none
completed twice, no (job, attempt) ran twice, every output matches its
payload, and nothing is left behind (assignments, busy slots, queues). It
prints a table, then one JSON line; the exit status is 1 when any check fails.
Logs stay in the printed folder.
"""

# The parts: chaos_system.py (processes, supervisor, killer), chaos_client.py (submissions and
# the watch on their states), chaos_checks.py (the evidence, the checks, the report).

from __future__ import annotations

import argparse
import contextlib
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

from chaos_checks import detail_of, failed, figures_of, read_evidence, report
from chaos_client import StateWatch, Submitter, settle
from chaos_system import (
    Supervisor,
    System,
    log,
    plan_faults,
    run_killer,
    start_system,
    wait_nodes_ready,
)
from common import raise_open_files_limit


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=5000)
    p.add_argument("--nodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--minutes", type=float, default=2.0, help="the submission window, during which faults happen")
    p.add_argument("--webs", type=int, choices=(1, 2), default=2)
    p.add_argument("--worker-concurrency", type=int, help="WORKER_CONCURRENCY of each worker (Procfile default)")
    p.add_argument("--node-kill-fraction", type=float, default=0.1)
    p.add_argument("--job-timeout-s", type=float, default=10.0)
    p.add_argument("--settle-minutes", type=float, default=3.0, help="how long to wait for the jobs to end")
    p.add_argument("--get-timeout-s", type=float, default=5.0)
    return p.parse_args()


def start_ready(args: argparse.Namespace, tmp: Path, supervisor: Supervisor) -> System:
    """The system with every node ready, under the supervisor's care."""
    system = start_system(args, tmp, supervisor)
    r = redis.Redis.from_url(system.store.url, decode_responses=True, socket_timeout=30)
    ready = wait_nodes_ready(r, args.nodes, timeout_s=180)
    if ready < args.nodes:
        raise SystemExit(f"only {ready}/{args.nodes} nodes became ready; see {tmp / 'logs'}")
    log(f"{args.nodes} nodes ready on {len(system.webs)} web processes; 2 workers, 2 beats; logs in {tmp / 'logs'}")
    supervisor.start()
    return system


def submit_through_faults(args: argparse.Namespace, system: System, job_ids: list[str]) -> tuple[Submitter, StateWatch]:
    """Submit the jobs over the window while the killer works, then wait (bounded) for them to end."""
    rng = random.Random(args.seed)
    window_s = args.minutes * 60
    faults = plan_faults(rng, system, window_s, args.node_kill_fraction)
    log("faults planned: " + ", ".join(f"{f.target.name}@{f.at_s:.0f}s" for f in faults))
    submitter = Submitter(system.store.url, job_ids, args.jobs / window_s, args.job_timeout_s)
    watch = StateWatch(system.store.url, job_ids, submitter, system.tmp / "probe.log")
    killer_done = threading.Event()
    killer = threading.Thread(target=run_killer, args=(faults, system.supervisor, time.monotonic(), killer_done),
                              name="killer", daemon=True)
    submitter.start()
    killer.start()
    watch.start()
    settle(watch, system.supervisor, killer_done, submitter, window_s + args.settle_minutes * 60)
    watch.stop()
    with contextlib.suppress(redis.RedisError):
        watch.look()  # one last look, so a change seen now still counts
    return submitter, watch


def run(args: argparse.Namespace, tmp: Path, supervisor: Supervisor) -> tuple[dict[str, Any], dict[str, Any]]:
    bench_t0 = time.monotonic()
    system = start_ready(args, tmp, supervisor)
    job_ids = [f"chaos-{args.seed}-{n:05d}" for n in range(args.jobs)]
    submitter, watch = submit_through_faults(args, system, job_ids)
    log("reading every result with a fresh client")
    evidence = read_evidence(system, job_ids, watch, args.get_timeout_s, args.nodes)
    return (figures_of(args, system, submitter, watch, evidence, bench_t0),
            detail_of(supervisor, submitter, watch, evidence))


def main() -> int:
    args = parse_args()
    raise_open_files_limit()
    # SIGTERM and SIGHUP end the bench like Ctrl-C does: through the cleanup below.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    tmp = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    supervisor = Supervisor()
    try:
        figures, detail = run(args, tmp, supervisor)
    finally:
        log("stopping every process")
        supervisor.stop_everything()
    report(figures, detail)
    return 1 if failed(figures) else 0


if __name__ == "__main__":
    sys.exit(main())
