"""/metrics: Prometheus text, the same fleet-wide figures from any web process, whichever
host each worker runs on (the counts go through Redis, dispatcher/tally.py)."""

from __future__ import annotations

import os
import signal
import types
from pathlib import Path
from typing import Any

import psutil
import redis

from dispatcher.fleet import Fleet
from dispatcher.keys import Keys
from dispatcher.metrics import DECISIONS, JOBS_FINISHED, SUBMIT_TO_ASSIGN, exposition
from dispatcher.registry import Registry
from dispatcher.scripts import Scripts
from dispatcher.settings import Settings
from dispatcher.tally import TALLY
from tests.support import (
    Samples,
    WebServer,
    clean_env,
    client_app,
    parse_metrics,
    register,
    scrape,
    start_procfile,
    wait_for,
)


def fleet_text(r: redis.Redis, settings: Settings) -> Samples:
    """/metrics as a web process would answer it, read from Redis in this process."""
    jobs = types.SimpleNamespace(client=r, keys=Keys(settings.key_prefix))
    return parse_metrics(exposition(Fleet(r, settings), jobs).decode())


def test_counts_go_to_redis_in_sums_once_a_second_not_a_command_each(r: redis.Redis, settings: Settings) -> None:
    TALLY.bind(r, Scripts(r, Keys(settings.key_prefix)))
    TALLY.flush()
    before = r.info("commandstats")
    for _ in range(500):
        DECISIONS.labels("assigned").inc()
        JOBS_FINISHED.labels("succeeded").inc()
        SUBMIT_TO_ASSIGN.observe(0.003)
    SUBMIT_TO_ASSIGN.observe(42.0)
    TALLY.flush()
    after = r.info("commandstats")
    calls = {name: after[name]["calls"] - before.get(name, {"calls": 0})["calls"]
             for name in ("cmdstat_hincrby", "cmdstat_hincrbyfloat")}
    assert calls == {"cmdstat_hincrby": 4, "cmdstat_hincrbyfloat": 1}, "one per series and bucket, not per count"

    m = fleet_text(r, settings)
    assert m["dispatcher_dispatch_decisions_total"][(("outcome", "assigned"),)] == 500
    assert m["dispatcher_dispatch_decisions_total"][(("outcome", "failed"),)] == 0, "known outcomes shown at 0"
    assert m["dispatcher_jobs_finished_total"][(("state", "succeeded"),)] == 500
    assert m["dispatcher_jobs_finished_total"][(("state", "cancelled"),)] == 0
    assert m["dispatcher_exclusions_total"][(("reason", "CapacityExceeded"),)] == 0
    buckets = m["dispatcher_job_submit_to_assign_seconds_bucket"]
    assert buckets[(("le", "0.001"),)] == 0 and buckets[(("le", "0.005"),)] == 500
    assert buckets[(("le", "30.0"),)] == 500 and buckets[(("le", "60.0"),)] == 501
    assert buckets[(("le", "+Inf"),)] == 501 == m["dispatcher_job_submit_to_assign_seconds_count"][()]
    assert abs(m["dispatcher_job_submit_to_assign_seconds_sum"][()] - 43.5) < 1e-6
    assert not any(name.startswith(("flower_", "process_", "python_")) for name in m)


def test_per_node_series_only_when_asked_and_for_at_most_that_many_nodes(
        r: redis.Redis, make_settings: Any) -> None:
    settings = make_settings(metrics_node_series=2)
    registry = Registry(r, settings)
    keys = Keys(settings.key_prefix)
    for node_id in ("n-a", "n-b", "n-c"):
        register(registry, node_id=node_id)
    scripts = Scripts(r, keys)
    TALLY.bind(r, scripts)
    for _ in range(3):
        TALLY.count_node("n-a", "finished_succeeded")
    TALLY.count_node("n-b", "finished_failed")
    TALLY.count_node("n-gone", "finished_succeeded")
    TALLY.flush()
    assert not r.exists(keys.node("n-gone")), "a node deleted meanwhile is not brought back"

    m = fleet_text(r, settings)
    finished = m["dispatcher_node_jobs_finished_total"]
    assert finished[(("node_id", "n-a"), ("state", "succeeded"))] == 3
    assert finished[(("node_id", "n-b"), ("state", "failed"))] == 1
    assert {labels[0][1] for labels in finished} == {"n-a", "n-b"}, "the first 2 nodes in id order"
    assert m["dispatcher_node_series_omitted"][()] == 1
    assert m["dispatcher_node_status"][(("node_id", "n-a"), ("status", "registering"))] == 1
    assert m["dispatcher_node_slots"][(("node_id", "n-a"),)] >= 1
    assert m["dispatcher_node_slots_used"][(("node_id", "n-a"),)] == 0

    assert not any(name.startswith("dispatcher_node_") for name in fleet_text(r, make_settings())), \
        "off by default"


def test_metrics_cover_the_fleet_the_decisions_and_the_latencies(system: Any, client: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = client.send_task("dispatcher.submit_job", kwargs={"job_type": "t", "required_models": ["m"]})
    node.succeed(node.take_job(), "ok")
    assert result.get(timeout=10) == "ok"
    waiting = client.send_task("dispatcher.submit_job", kwargs={"job_type": "t", "required_models": ["absent"]})

    def counted() -> Samples:
        # Each process adds its counts to Redis once a second: wait for the web's, the worker's
        # (its completion loop counts the finished job) and its pool process's (the submission
        # task counts the decision), three processes flushing on their own clocks.
        m = scrape(system)
        done = m["dispatcher_jobs_finished_total"][(("state", "succeeded"),)] >= 1
        decided = m["dispatcher_dispatch_decisions_total"][(("outcome", "assigned"),)] >= 1
        ready = m.get("dispatcher_status_transitions_total", {}).get(
            (("from_status", "registering"), ("to_status", "ready")), 0) >= 1
        return m if done and decided and ready else {}
    m = wait_for(counted, what="the worker's and the web's counts")
    assert m["dispatcher_nodes"][(("status", "ready"),)] >= 1
    assert m["dispatcher_status_transitions_total"][(("from_status", "registering"), ("to_status", "ready"))] >= 1
    assert m["dispatcher_heartbeats_total"][(("healthy", "true"),)] >= 3
    wait_for(lambda: scrape(system)["dispatcher_jobs_waiting"][()] >= 1, what="the waiting job counted")
    m = wait_for(lambda: (s := scrape(system))["dispatcher_exclusions_total"].get(
        (("reason", "ModelNotAvailable"),), 0) >= 1 and s, what="its exclusion counted (flushed within a second)")
    assert m["dispatcher_jobs_finished_total"][(("state", "succeeded"),)] >= 1
    assert m["dispatcher_job_submit_to_assign_seconds_count"][()] >= 1
    assert m["dispatcher_job_assign_to_result_seconds_count"][()] >= 1
    assert m["dispatcher_lua_script_seconds_count"][(("script", "submit_job"),)] >= 1
    assert m["dispatcher_lua_script_seconds_count"][(("script", "record_heartbeat"),)] >= 3
    assert m["dispatcher_web_sessions"][()] >= 1
    assert m["dispatcher_partition_suspected"][()] == 0
    assert m["dispatcher_results_unapplied"][()] == 0, "every result applied"
    client.send_task("dispatcher.cancel_job", kwargs={"job_id": waiting.id}).get(timeout=10)


def test_a_web_process_shows_what_a_worker_elsewhere_counted_and_nothing_of_other_processes(
        own_redis: tuple[str, redis.Redis], logs_dir: Path, tmp_path: Path, live_nodes: Any) -> None:
    """As on a PaaS, where each process has a host (and a folder) of its own; Flower shares
    the web's folder, as the old docs had it."""
    url, _ = own_redis
    fast = {"require_gpu": False, "heartbeat_interval_seconds": 0.3, "heartbeat_timeout_seconds": 3,
            "periodic_scan_interval_seconds": 0.5, "resource_threshold_percent": 90}
    folders = {name: tmp_path / name for name in ("web", "worker")}
    for folder in folders.values():
        folder.mkdir()
    web = WebServer(url, logs_dir, **fast, PROMETHEUS_MULTIPROC_DIR=str(folders["web"])).start()
    env = clean_env(url, **fast)
    worker = start_procfile("worker", {**env, "WORKER_CONCURRENCY": "1",
                                       "PROMETHEUS_MULTIPROC_DIR": str(folders["worker"])}, logs_dir)
    from dispatcher.localrun.redis_server import free_port

    flower = start_procfile("flower", {**env, "FLOWER_PORT": str(free_port()),
                                       "PROMETHEUS_MULTIPROC_DIR": str(folders["web"])}, logs_dir)
    try:
        wait_for(lambda: "ready." in worker.log(), 30, 0.1, what="worker ready")
        node = live_nodes(web, {"m": "ready"}).wait_ready()
        result = client_app(url).send_task("dispatcher.submit_job", kwargs={"job_type": "t", "required_models": ["m"]})
        node.succeed(node.take_job(), "ok")
        assert result.get(timeout=10) == "ok"
        wait_for(lambda: "Visit me at" in flower.log(), 30, 0.2, what="flower up")

        def counted() -> Samples:
            m = scrape(web, keep_pid=True)
            finished = m.get("dispatcher_jobs_finished_total", {}).get((("state", "succeeded"),), 0)
            return m if finished >= 1 else {}
        m = wait_for(counted, 10, 0.2, what="the worker's counts in the web's /metrics")
        assert m["dispatcher_dispatch_decisions_total"][(("outcome", "assigned"),)] == 1
        assert m["dispatcher_job_submit_to_assign_seconds_count"][()] == 1
        assert m["dispatcher_job_assign_to_result_seconds_count"][()] == 1
        assert m["dispatcher_lua_script_seconds_count"][(("script", "submit_job"),)] == 1, "counted in the worker"
        assert m["dispatcher_heartbeats_total"][(("healthy", "true"),)] >= 3, "counted in the web process"
        assert not [name for name in m if name.startswith("flower_")], "Flower's own metrics stay out"
        with_pid = {name for name, series in m.items() for labels in series if "pid" in dict(labels)}
        assert with_pid == {"dispatcher_web_sessions"}, with_pid

        # A web worker that dies leaves no series behind; its replacement has its own.
        gunicorn = psutil.Process(web.process.popen.pid)  # type: ignore[union-attr]
        (old,) = gunicorn.children()
        os.kill(old.pid, signal.SIGKILL)
        new = wait_for(lambda: [c.pid for c in gunicorn.children() if c.pid != old.pid], 20, 0.1,
                       what="gunicorn's new worker")[0]
        wait_for(lambda: web.get("/healthz")[0] == 200, 10, 0.1, what="the new worker answering")
        live_nodes(web, {"m": "ready"}).wait_ready()
        pids = {dict(labels)["pid"] for labels in scrape(web, keep_pid=True)["dispatcher_web_sessions"]}
        assert pids == {str(new)}, pids
        assert not list(folders["worker"].iterdir()), "a Celery worker writes no metrics files"
    finally:
        flower.stop()
        worker.stop()
        web.stop()
