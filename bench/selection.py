"""What choosing a node costs Redis, against the size of the fleet.

    python bench/selection.py [--sizes 100,1000,10000] [--jobs 300] [--plot docs/img/selection.png]

For each fleet size it registers that many nodes on a private redis-server (the
registry's own scripts, a fixed clock: every node ready, two slots, half of them
taken by earlier jobs), then submits jobs one at a time and reads the Redis time
of each dispatch from the slow log (set to record every command): the server's
own time for the submit_job script, which enqueues the job and looks for a node
in one call. Each job is cancelled right after, so the fleet's load stays as it
was. Three kinds of job:

- common: a model every node has (the first page of the capacity index answers);
- few: a model 10 nodes have, whatever the fleet's size (one page, then an intersection);
- rare: a model 1 node in 100 has: 1 node of 100, 100 of 10,000 (the intersection's
  work grows with the nodes that have it, not with the fleet);
- hopeless: a model no node has (the search comes back empty: a waiting decision).

The baseline is the smallest fleet; the ratio is each size's median against it.

Then, on 100 nodes, what a submission and a completion cost (Redis time of the
scripts and stream calls, and commands) with no job waiting, and with
``--backlog`` jobs waiting that no node can take.

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from common import ROOT, LocalRedis, pct

sys.path.insert(0, str(ROOT))
from celery import Celery

from dispatcher.completions import Completions
from dispatcher.jobs import Jobs
from dispatcher.messages import NodeHeartbeat, NodeRegister, decode_node_message
from dispatcher.registry import Registry
from dispatcher.scripts import script_sources
from dispatcher.settings import load_settings

NOW_MS = 1_800_000_000_000
KINDS = {"common": ["everyone"], "few": ["few"], "rare": ["rare"], "hopeless": ["nobody"]}


def build_fleet(registry: Registry, jobs: Jobs, size: int) -> None:
    """``size`` ready nodes with two slots each, one of them busy; 10 have the model "few", 1 in
    100 the model "rare"."""
    for i in range(size):
        models = [{"model_id": "everyone", "status": "ready"}]
        if i % 100 == 0:
            models.append({"model_id": "rare", "status": "ready"})
        if i % (size // 10) == 0:
            models.append({"model_id": "few", "status": "ready"})
        msg = NodeRegister.model_validate_json(json.dumps({"type": "node_register", "max_concurrent_jobs": 2,
                                                       "installed_models": models}))
        node = registry.register(msg, f"s{i}", "bench", now=NOW_MS - 10_000).node
        beat = NodeHeartbeat.model_validate_json(json.dumps({"type": "node_heartbeat", "gpu_available": False,
                                                         "resource_usage": {"cpu_percent": 5, "mem_percent": 5}}))
        for k in range(3):
            registry.heartbeat(node, beat, now=NOW_MS - 3_000 + k * 1_000)
    for i in range(size):  # least loaded first: one job lands on each node
        jobs.submit(f"load-{i}", {"job_type": "bench", "required_models": ["everyone"]})


def dispatch_usec(client: redis.Redis, jobs: Jobs, models: list[str], n: int, sha: str) -> tuple[list[int], str]:
    """Server time of each submit_job script (µs), and the last decision's outcome."""
    client.slowlog_reset()
    outcome = ""
    for _ in range(n):
        job_id = f"probe-{models[0]}-{time.monotonic_ns()}"
        decision = jobs.submit(job_id, {"job_type": "bench", "required_models": models})
        outcome = decision.outcome if decision else "queued"
        jobs.cancel(job_id)
    durations = []
    for entry in client.slowlog_get(1 << 30):
        command = entry["command"]
        command = command.decode() if isinstance(command, bytes) else command
        if command.lower().startswith("evalsha " + sha):
            durations.append(int(entry["duration"]))
    return durations, outcome


def step_costs(client: redis.Redis, jobs: Jobs, n: int) -> dict[str, float]:
    """Redis time (µs: the scripts, and the stream calls around them) and commands of a
    submission and of its completion (the node's result handed on and applied), averaged."""
    def usec_and_calls() -> tuple[float, int]:
        stats = client.info("commandstats")
        usec = sum(stats.get(f"cmdstat_{c}", {}).get("usec", 0) for c in ("evalsha", "xadd", "xreadgroup", "xack"))
        return usec, sum(v["calls"] for v in stats.values())
    completions = Completions(jobs, "bench")
    totals = {"submit_us": 0.0, "submit_commands": 0, "complete_us": 0.0, "complete_commands": 0}
    node_of: dict[str, str] = {}
    for i in range(n):
        job_id = f"step-{time.monotonic_ns()}-{i}"
        client.config_resetstat()
        decision = jobs.submit(job_id, {"job_type": "bench", "required_models": ["everyone"]})
        usec, calls = usec_and_calls()
        totals["submit_us"] += usec
        totals["submit_commands"] += calls
        assert decision is not None and decision.node_id, decision
        node_of[job_id] = decision.node_id
        frame = json.dumps({"type": "job_result", "job_id": job_id, "attempt": 1, "success": True, "output": 1})
        client.config_resetstat()
        jobs.report_result(decision.node_id, decode_node_message(frame))  # type: ignore[arg-type]
        completions.apply(completions.read(None))
        usec, calls = usec_and_calls()
        totals["complete_us"] += usec
        totals["complete_commands"] += calls
    return {k: round(v / n, 1) for k, v in totals.items()}


def backlog_figures(client: redis.Redis, jobs: Jobs, registry: Registry, waiting: int, n: int) -> dict[str, Any]:
    """A submission's and a completion's cost with no job waiting, then with ``waiting`` jobs
    waiting for a model no node has (a model outage, or a flood of hopeless submissions)."""
    client.flushall()
    build_fleet(registry, jobs, 100)
    step_costs(client, jobs, 50)  # warm
    alone = step_costs(client, jobs, n)
    pipe_size = 500
    for start in range(0, waiting, pipe_size):
        for i in range(start, min(waiting, start + pipe_size)):
            jobs.submit(f"hopeless-{i}", {"job_type": "bench", "required_models": ["nobody"]})
    behind = step_costs(client, jobs, n)
    jobs.dispatcher.flush()
    return {"waiting": waiting, "none_waiting": alone, "backlog": behind,
            "ratio_submit_us": round(behind["submit_us"] / alone["submit_us"], 2),
            "ratio_complete_us": round(behind["complete_us"] / alone["complete_us"], 2)}


def plot(path: Path, figures: dict[int, dict[str, dict[str, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(figures)
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in KINDS:
        ax.plot(sizes, [figures[s][kind]["median_us"] for s in sizes], marker="o", label=f"{kind} (median)")
    ax.set_xscale("log")
    ax.set_xlabel("registered nodes")
    ax.set_ylabel("Redis time of one dispatch (µs)")
    ax.set_title("Choosing a node: Redis time against fleet size")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--jobs", type=int, default=300, help="dispatches measured per kind and size")
    parser.add_argument("--plot", type=Path, help="write a PNG of Redis time against fleet size")
    parser.add_argument("--backlog", type=int, default=10_000,
                        help="jobs left waiting that no node can take, for the last measure (0: skip it)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-selection-"))
    store = LocalRedis(tmp / "redis", append_only=False).start()
    client = redis.Redis.from_url(store.url, decode_responses=True)
    sha = hashlib.sha1(script_sources()["submit_job"].encode()).hexdigest()
    figures: dict[int, dict[str, Any]] = {}  # kind -> its figures, and fleet_built_s
    try:
        client.config_set("slowlog-log-slower-than", 0)
        client.config_set("slowlog-max-len", 100 * args.jobs)
        for size in sizes:
            client.flushall()
            settings = load_settings(redis_url=store.url, require_gpu=False, resource_threshold_percent=100,
                                     heartbeat_timeout_seconds=3600)
            clock = lambda: NOW_MS  # noqa: E731
            registry = Registry(client, settings, clock=clock)
            jobs = Jobs(client, settings, Celery(broker=store.url, backend=store.url), clock=clock)
            t0 = time.monotonic()
            build_fleet(registry, jobs, size)
            built_s = time.monotonic() - t0
            figures[size] = {}
            for kind, models in KINDS.items():
                dispatch_usec(client, jobs, models, 100, sha)  # warm
                durations, outcome = dispatch_usec(client, jobs, models, args.jobs, sha)
                figures[size][kind] = {"median_us": statistics.median(durations), "p99_us": pct(durations, 0.99),
                                       "outcome": outcome, "measured": len(durations)}
            figures[size]["fleet_built_s"] = round(built_s, 1)
            jobs.dispatcher.flush()
        backlog = backlog_figures(client, jobs, registry, args.backlog, args.jobs) if args.backlog else None
    finally:
        store.stop()

    base = sizes[0]
    print(f"\nRedis time of one dispatch (submit_job script, slow log), {args.jobs} jobs per kind and size\n")
    print(f"{'nodes':>8s} " + " ".join(f"{kind + ' p50/p99 µs':>22s}" for kind in KINDS)
          + " " + " ".join(f"{kind:>9s}" for kind in KINDS))
    ratios: dict[str, dict[str, float]] = {}
    for size in sizes:
        row = figures[size]
        ratios[str(size)] = {kind: row[kind]["median_us"] / figures[base][kind]["median_us"] for kind in KINDS}
        print(f"{size:8d} " + " ".join(f"{row[k]['median_us']:>12.0f} / {row[k]['p99_us']:<7.0f}" for k in KINDS)
              + " " + " ".join(f"{ratios[str(size)][k]:8.2f}x" for k in KINDS))
    print("\nOutcomes: " + ", ".join(f"{k}: {figures[sizes[-1]][k]['outcome']}" for k in KINDS)
          + f"; ratios are medians against {base} nodes.")
    if backlog:
        print(f"\nWith {backlog['waiting']:,} jobs waiting that no node can take (100 nodes), per job:")
        print(f"{'':24s} {'none waiting':>14s} {'backlog':>10s} {'ratio':>7s}")
        for step in ("submit", "complete"):
            a, b = backlog["none_waiting"], backlog["backlog"]
            print(f"  {step + ' Redis time (µs)':22s} {a[step + '_us']:14.1f} {b[step + '_us']:10.1f} "
                  f"{backlog['ratio_' + step + '_us']:6.2f}x")
            print(f"  {step + ' commands':22s} {a[step + '_commands']:14.1f} {b[step + '_commands']:10.1f}")
    if args.plot:
        plot(args.plot, figures)
        print(f"plot: {args.plot}")
    print(json.dumps({"sizes": sizes, "jobs": args.jobs, "figures": {str(s): f for s, f in figures.items()},
                      "backlog": backlog,
                      "ratio_vs_smallest": {s: {k: round(v, 2) for k, v in r.items()} for s, r in ratios.items()}}))


if __name__ == "__main__":
    main()
