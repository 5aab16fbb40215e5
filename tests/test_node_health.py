"""A node's health beyond its heartbeats, on real Redis with an injected clock: job
outcomes (node faults and timeouts) in a sliding window that degrades a black-hole
node for JobFailures, and the node's running_jobs reconciled with its assigned jobs."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
import redis

from dispatcher.fleet import Fleet
from dispatcher.jobs import Jobs
from dispatcher.keys import Keys
from dispatcher.messages import NodeHeartbeat, NodeRegister, decode_node_message
from dispatcher.recovery import Recovery
from dispatcher.registry import Registration, Registry
from tests.support import T0, apply_result, client_app, log_events, run_cli, scrape, wait_for

#: The key prefix of these tests' own (the session's running system never touches it).
PREFIX = "{healthtest}"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def world(make_settings: Any, r: redis.Redis, db_url: str, clock: Clock) -> tuple[Registry, Jobs, redis.Redis]:
    settings = make_settings(key_prefix=PREFIX, job_failures_cooldown_seconds=60)
    return Registry(r, settings, clock=clock), Jobs(r, settings, client_app(db_url), clock=clock), r


@pytest.fixture
def keys() -> Keys:
    return Keys(PREFIX)


def join(registry: Registry, clock: Clock, secret: str | None = None, node_id: str | None = None) -> Registration:
    """Register a node (or resume one) and make it ready with 3 healthy heartbeats."""
    msg = NodeRegister.model_validate_json(json.dumps({"type": "node_register", "node_id": node_id,
                                                       "node_secret": secret}))
    reg = registry.register(msg, f"s-{clock.now}", "w")
    for _ in range(3):
        heartbeat(registry, reg, clock)
    return reg


def heartbeat(registry: Registry, reg: Registration, clock: Clock, running_jobs: int = 0, advance_ms: int = 100) -> Any:
    clock.now += advance_ms
    beat = NodeHeartbeat.model_validate_json(json.dumps({
        "type": "node_heartbeat",
        "resource_usage": {"cpu_percent": 5, "mem_percent": 5, "running_jobs": running_jobs}}))
    return registry.heartbeat(reg.node, beat).outcome


def node(r: redis.Redis, keys: Keys, node_id: str) -> dict[str, str]:
    return r.hgetall(keys.node(node_id))


def run_job(jobs: Jobs, job_id: str, outcome: str, node_id: str | None = None) -> str:
    """Submit a job (one attempt) and answer it from the node it went to: "ok", "fault:<CODE>"
    (an error with node_fault), "error:<CODE>" (without), or "timeout" (the scan takes it back).
    Returns the node it ran on."""
    jobs.submit(job_id, {"job_type": "asr", "max_attempts": 1, "timeout_seconds": 1})
    holder = jobs.client.hget(jobs.keys.job(job_id), "node_id")
    assert holder, f"{job_id} was not assigned"
    assert node_id is None or holder == node_id, f"{job_id} went to {holder}, not {node_id}"
    if outcome == "timeout":
        jobs.clock.now += 1_500  # type: ignore[attr-defined]
        assert Recovery(jobs).scan(now=jobs.clock()).timed_out == [job_id]
        return holder
    frame: dict[str, Any] = {"type": "job_result", "job_id": job_id, "attempt": 1, "success": outcome == "ok"}
    if outcome != "ok":
        kind, code = outcome.split(":")
        frame["error"] = {"code": code, "message": "boom", "retryable": False, "node_fault": kind == "fault"}
    assert apply_result(jobs, holder, decode_node_message(json.dumps(frame))) in ("succeeded", "failed")
    return holder


def test_five_node_faults_in_a_row_degrade_the_node_and_the_healthy_one_takes_the_jobs(
        world: tuple[Registry, Jobs, redis.Redis], keys: Keys, clock: Clock) -> None:
    registry, jobs, r = world
    bad = join(registry, clock).node.node_id
    for i in range(4):
        run_job(jobs, f"j{i}", "fault:CUDA_ERROR", bad)
        assert node(r, keys, bad)["status"] == "ready", f"still ready after {i + 1} failures"
    assert node(r, keys, bad)["job_window"] == "0000"
    health = Fleet(r, registry.settings, clock=clock).node(bad)["job_health"]  # type: ignore[index]
    assert (health["window_failures"], health["consecutive_failures"], health["cooldown_until_ms"]) == (4, 4, None)
    run_job(jobs, "j4", "fault:CUDA_ERROR", bad)
    degraded_at = clock.now
    record = node(r, keys, bad)
    assert record["status"] == "degraded"
    assert record["status_reason"] == "JobFailures: 5 of the last 5 jobs failed (CUDA_ERROR)"
    assert record["job_window"] == "", "the window starts afresh"
    assert not r.zscore(keys.capacity_index(), bad), "out of the capacity index: no job can reach it"
    frames = [json.loads(f) for f in r.lrange(keys.queue(bad), 0, -1)]
    told = [f for f in frames if f["type"] == "node_status"][-1]
    assert (told["status"], told["previous_status"]) == ("degraded", "ready")
    assert told["reason"].startswith("JobFailures")

    good = join(registry, clock).node.node_id
    for i in range(5, 8):
        assert run_job(jobs, f"j{i}", "ok") == good
    view = Fleet(r, registry.settings, clock=clock).node(bad)
    assert view is not None
    assert view["job_health"]["last_failure"] == {"code": "CUDA_ERROR", "job_id": "j4", "at_ms": degraded_at}
    assert view["job_health"]["cooldown_until_ms"] == degraded_at + 60_000


def new_node_runs(world: tuple[Registry, Jobs, redis.Redis], clock: Clock,
                  pattern: list[str]) -> tuple[str, dict[str, str]]:
    """A new ready node runs jobs j0, j1 ... with these outcomes (see ``run_job``): its id and record."""
    registry, jobs, r = world
    node_id = join(registry, clock).node.node_id
    for i, outcome in enumerate(pattern):
        run_job(jobs, f"j{i}", outcome, node_id)
    return node_id, node(r, Keys(PREFIX), node_id)


def test_errors_without_node_fault_never_degrade(world: tuple[Registry, Jobs, redis.Redis], clock: Clock) -> None:
    _, record = new_node_runs(world, clock, ["error:BAD_AUDIO"] * 12)
    assert record["status"] == "ready"
    assert record["job_window"] == "1" * 10, "they count as good outcomes"


def test_seven_failures_of_the_last_ten_degrade_without_five_in_a_row(
        world: tuple[Registry, Jobs, redis.Redis], clock: Clock) -> None:
    oom = "fault:OUT_OF_MEMORY"
    node_id, record = new_node_runs(world, clock, ["ok", oom, oom, oom, oom, "error:BAD_AUDIO", oom, oom, "ok"])
    assert (record["status"], record["job_window"]) == ("ready", "100001001"), "6 of 9, never 5 in a row"
    run_job(world[1], "j9", "fault:MODEL_CRASHED", node_id)
    record = node(world[2], Keys(PREFIX), node_id)
    assert (record["status"], record["status_reason"]) == (
        "degraded", "JobFailures: 7 of the last 10 jobs failed (MODEL_CRASHED)")


def test_a_success_ends_the_run_and_old_failures_slide_out(world: tuple[Registry, Jobs, redis.Redis],
                                                           clock: Clock) -> None:
    _, record = new_node_runs(world, clock, ["fault:X"] * 4 + ["ok"] * 7 + ["fault:X"] * 4 + ["ok"])
    assert (record["status"], record["job_window"]) == ("ready", "1111100001")


def test_timeouts_count_against_the_node(world: tuple[Registry, Jobs, redis.Redis], clock: Clock) -> None:
    node_id, record = new_node_runs(world, clock, ["fault:CUDA_ERROR", "timeout", "fault:CUDA_ERROR", "timeout"])
    assert record["status"] == "ready"
    run_job(world[1], "j4", "timeout", node_id)
    record = node(world[2], Keys(PREFIX), node_id)
    assert (record["status"], record["status_reason"]) == (
        "degraded", "JobFailures: 5 of the last 5 jobs failed (TIMEOUT)")


def test_a_cancelled_job_does_not_count(world: tuple[Registry, Jobs, redis.Redis], keys: Keys,
                                        clock: Clock) -> None:
    registry, jobs, r = world
    node_id = join(registry, clock).node.node_id
    for i in range(6):
        jobs.submit(f"j{i}", {"job_type": "asr"})
        jobs.cancel(f"j{i}")
    assert node(r, keys, node_id).get("job_window", "") == ""
    assert node(r, keys, node_id)["status"] == "ready"


def test_the_node_comes_back_after_the_cool_down_and_not_before(world: tuple[Registry, Jobs, redis.Redis],
                                                                 keys: Keys, clock: Clock) -> None:
    registry, jobs, r = world
    reg = join(registry, clock)
    node_id = reg.node.node_id
    for i in range(5):
        run_job(jobs, f"j{i}", "fault:CUDA_ERROR", node_id)
    degraded_at = clock.now
    for _ in range(5):
        outcome = heartbeat(registry, reg, clock, advance_ms=10_000)
        assert (outcome.status, outcome.transitioned) == ("degraded", False), "healthy, but cooling down"
    clock.now = degraded_at + 59_999
    assert heartbeat(registry, reg, clock, advance_ms=0).status == "degraded"
    outcome = heartbeat(registry, reg, clock, advance_ms=1)
    assert (outcome.status, outcome.reason) == ("ready", "health check passed (job failures cool-down over)")
    record = node(r, keys, node_id)
    assert (record["job_window"], record["job_cooldown_until_ms"]) == ("", "")
    for i in range(5, 9):  # a fresh window: 4 more failures are not enough
        run_job(jobs, f"j{i}", "fault:CUDA_ERROR", node_id)
    assert node(r, keys, node_id)["status"] == "ready"
    run_job(jobs, "j9", "fault:CUDA_ERROR", node_id)
    assert node(r, keys, node_id)["status"] == "degraded"


def test_a_node_cooling_down_stays_out_of_ready_when_it_reconnects(world: tuple[Registry, Jobs, redis.Redis],
                                                                    keys: Keys, clock: Clock) -> None:
    registry, jobs, r = world
    reg = join(registry, clock)
    for i in range(5):
        run_job(jobs, f"j{i}", "timeout", reg.node.node_id)
    again = join(registry, clock, reg.secret, reg.node.node_id)  # resumes: registering, 3 healthy heartbeats
    assert again.resumed and node(r, keys, again.node.node_id)["status"] == "registering"
    clock.now += 60_000
    outcome = heartbeat(registry, again, clock)
    assert (outcome.status, outcome.reason) == (
        "ready", "4 consecutive healthy heartbeats (job failures cool-down over)")


# --- running_jobs against the assigned jobs ---------------------------------------------


def test_a_running_jobs_mismatch_is_told_once_per_episode(world: tuple[Registry, Jobs, redis.Redis], keys: Keys,
                                                          clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    registry, _jobs, r = world
    reg = join(registry, clock)
    node_id = reg.node.node_id
    fleet = Fleet(r, registry.settings, clock=clock)
    caplog.set_level(logging.INFO, logger="dispatcher.registry")
    # two heartbeats that disagree, then one that agrees: an assignment in flight, not an episode
    assert [heartbeat(registry, reg, clock, running_jobs=n).mismatch for n in (2, 2, 0)] == ["", "", ""]
    outcomes, times = [], []
    for _ in range(5):
        outcomes.append(heartbeat(registry, reg, clock, running_jobs=2))
        times.append(clock.now)
    assert [o.mismatch for o in outcomes] == ["", "", "began", "", ""]
    logged = [rec for rec in caplog.records if getattr(rec, "event", "") == "running_jobs_mismatch"]
    assert len(logged) == 1 and (logged[0].running_jobs, logged[0].assigned_jobs) == (2, 0)
    shown = fleet.node(node_id)["running_jobs_mismatch"]  # type: ignore[index]
    assert (shown["running_jobs"], shown["assigned_jobs"], shown["heartbeats"]) == (2, 0, 5)
    assert shown["since_ms"] == times[2]

    assert heartbeat(registry, reg, clock, running_jobs=0).mismatch == "ended"
    assert fleet.node(node_id)["running_jobs_mismatch"] is None  # type: ignore[index]
    assert [rec for rec in caplog.records if getattr(rec, "event", "") == "running_jobs_reconciled"]
    assert heartbeat(registry, reg, clock, running_jobs=0).mismatch == ""


def test_matching_counts_with_assigned_jobs_are_no_mismatch(world: tuple[Registry, Jobs, redis.Redis],
                                                           clock: Clock) -> None:
    registry, jobs, r = world
    reg = join(registry, clock)
    jobs.submit("j", {"job_type": "asr"})
    outcomes = [heartbeat(registry, reg, clock, running_jobs=1) for _ in range(5)]
    assert {(o.mismatch, o.assigned) for o in outcomes} == {("", 1)}
    outcomes = [heartbeat(registry, reg, clock, running_jobs=0) for _ in range(3)]
    assert outcomes[-1].mismatch == "began", "the node dropped the job it was given"
    report = Fleet(r, registry.settings, clock=clock).status_reports([reg.node.node_id])[reg.node.node_id]
    assert report.assigned_jobs == ["j"], "the periodic report names what the node should be running"


# --- real sessions, the shared system (slow) ----------------------------------------------


def test_a_black_hole_session_node_stops_getting_jobs(system: Any, client: Any, live_nodes: Any,
                                                      r: redis.Redis) -> None:
    """A node that fails every job at once by its own fault is picked first (it is always the
    least loaded); after 5 such failures it is degraded for JobFailures and the healthy node,
    busy until then, takes the next job."""
    healthy = live_nodes(system.web, {"m": "ready"}).wait_ready()
    held = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr"}, task_id="bh-held")
    held_job = healthy.take_job()
    black_hole = live_nodes(system.web, {"m": "ready"}).wait_ready()
    for i in range(5):
        result = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr", "max_attempts": 1},
                                  task_id=f"bh-{i}")
        job = black_hole.take_job(job_id=result.id)
        black_hole.send({"type": "job_result", "job_id": job["job_id"], "attempt": 1, "success": False,
                         "error": {"code": "CUDA_ERROR", "message": "CUDA error: an illegal memory access",
                                   "retryable": False, "node_fault": True}})
        with pytest.raises(Exception, match="CUDA_ERROR"):
            result.get(timeout=10)
    told = black_hole.expect("node_status", status="degraded")
    assert told["reason"] == "JobFailures: 5 of the last 5 jobs failed (CUDA_ERROR)"

    after = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr"}, task_id="bh-after")
    # Its dispatch is over, the black hole free and the healthy node busy: it waits.
    wait_for(lambda: after.state == "WAITING", what="the job after waiting")
    healthy.succeed(held_job, "held")
    healthy.succeed(healthy.take_job(job_id=after.id), "after")
    assert (held.get(timeout=10), after.get(timeout=10)) == ("held", "after")
    assert len(black_hole.assigned()) == 5, "no job for the degraded node"

    status, view = system.web.get(f"/api/nodes/{black_hole.node_id}")
    assert status == 200 and view["status"] == "degraded"
    assert view["job_health"]["window"] == "" and view["job_health"]["last_failure"]["code"] == "CUDA_ERROR"
    assert view["job_health"]["cooldown_until_ms"] > time.time() * 1000
    described = run_cli(system, "node", black_hole.node_id)
    assert described.returncode == 0, described.stderr
    assert "Job outcomes:  window (empty); last failure CUDA_ERROR (job bh-4); JobFailures cool-down, " \
        in described.stdout


def test_a_session_node_whose_running_jobs_disagree_is_shown_and_counted(system: Any, live_nodes: Any,
                                                                         r: redis.Redis) -> None:
    def counted() -> float:
        return scrape(system).get("dispatcher_running_jobs_mismatches_total", {}).get((), 0)

    def heartbeats_counted() -> float:
        return sum(scrape(system).get("dispatcher_heartbeats_total", {}).values())

    def web_counts_flushed() -> None:
        """Wait for the web process to add its counts to Redis (once a second) after this moment:
        only it counts heartbeats, and this node sends one every 0.3 s, so the next sum that
        moves was written later, with whatever was counted before."""
        seen = heartbeats_counted()
        wait_for(lambda: heartbeats_counted() > seen, what="the web process's counts added to Redis")

    def mismatched_heartbeats() -> int:
        return (system.web.get(f"/api/nodes/{node.node_id}")[1]["running_jobs_mismatch"] or {}).get("heartbeats", 0)
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    web_counts_flushed()  # with what earlier tests counted
    before = counted()
    node.usage["running_jobs"] = 2  # nothing was assigned to it
    shown = wait_for(lambda: system.web.get(f"/api/nodes/{node.node_id}")[1]["running_jobs_mismatch"],
                     what="the mismatch on the node's view")
    assert (shown["running_jobs"], shown["assigned_jobs"]) == (2, 0) and shown["heartbeats"] >= 3
    described = run_cli(system, "node", node.node_id)
    assert "Running jobs:  MISMATCH: the node reports 2, 0 assigned, for " in described.stdout
    wait_for(lambda: counted() >= before + 1, what="the episode counted")
    # More heartbeats that disagree, each handled before the next (one session, in order), and
    # counted: still one episode.
    more = mismatched_heartbeats() + 4
    wait_for(lambda: mismatched_heartbeats() >= more, what="four more heartbeats that disagree")
    web_counts_flushed()
    assert counted() == before + 1
    assert len(log_events(system.web.process, "running_jobs_mismatch", node_id=node.node_id)) == 1
    node.usage["running_jobs"] = 0
    wait_for(lambda: system.web.get(f"/api/nodes/{node.node_id}")[1]["running_jobs_mismatch"] is None,
             what="reconciled")
