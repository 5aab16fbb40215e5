"""The dispatch filter and choice, on real Redis with an injected clock.

These tests use their own key prefix, so the session's running system (whose
worker and beat share this Redis) never touches what they build.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from dispatcher.filter import NODE_FIELDS, JobNeeds, evaluate, first_failure
from dispatcher.jobs import Jobs
from dispatcher.jobviews import JobViews
from dispatcher.keys import Keys
from dispatcher.messages import decode_node_message
from dispatcher.registry import Registry
from dispatcher.scripts import Assigned, Waiting
from dispatcher.vocabulary import Exclusion
from tests.support import CORE_PREFIX, T0, add_node, apply_result, client_app, forget_everything


@pytest.fixture
def core(make_settings: Any, r: redis.Redis, db_url: str) -> tuple[Registry, Jobs]:
    settings = make_settings(key_prefix=CORE_PREFIX, resource_threshold_percent=80, exclusion_examples=3,
                             dispatch_candidates=50)
    clock = lambda: T0 + 10_000  # noqa: E731
    return Registry(r, settings, clock=clock), Jobs(r, settings, client_app(db_url), clock=clock)


def fill(r: redis.Redis, keys: Keys, node_id: str, jobs: int) -> None:
    """Occupy slots as earlier assignments would have."""
    for i in range(jobs):
        r.hset(keys.assigned(node_id), f"filler-{i}", "{}")
    max_jobs = int(r.hget(keys.node(node_id), "max_concurrent_jobs"))
    if jobs >= max_jobs:
        r.zrem(keys.capacity_index(), node_id)
    else:
        r.zadd(keys.capacity_index(), {node_id: jobs / max_jobs})


def test_a_waiting_decision_counts_from_the_indexes_and_a_question_walks_the_fleet(
        core: tuple[Registry, Jobs]) -> None:
    registry, jobs = core
    for _ in range(7):
        add_node(registry, beats=1)  # registering
    busy = add_node(registry, models={"a": "ready"})
    fill(jobs.client, jobs.keys, busy, 1)
    add_node(registry, models={"b": "ready"})
    decision = jobs.submit("j-1", {"job_type": "t", "required_models": ["a"]})
    assert decision.outcome == "waiting" and (decision.eligible, decision.total) == (0, 9)
    assert decision.exclusions["counts"] == {"StatusNotReady": 7, "ModelNotAvailable": 1, "CapacityExceeded": 1}
    stats = jobs.dispatcher.stats()
    assert stats["excluded"]["StatusNotReady"] == 7 and stats["decisions"] == {"waiting": 1}
    why = JobViews(jobs).view("j-1")["why_waiting"]
    assert why["counts"] == decision.exclusions["counts"]
    assert len(why["examples"]["StatusNotReady"]) == 3, "examples are capped per reason"
    assert why["examples"]["CapacityExceeded"] == [busy]
    assert why["summary"].startswith("0/9 nodes eligible: 7 StatusNotReady, 1 ModelNotAvailable, 1 CapacityExceeded")


def test_the_indexes_and_the_walk_count_alike(core: tuple[Registry, Jobs], r: redis.Redis) -> None:
    """Why a job waits (its Celery WAITING meta) is counted from the indexes and has examples
    from a bounded look; the walk over every node, which explains a failure, agrees."""
    registry, jobs = core
    spec = {"job_type": "t", "required_models": ["a"], "require_gpu": True, "public": True,
            "node_selector": {"zone": "1"}}
    assert jobs.submit("j-1", spec).outcome == "waiting"  # before any node registers
    add_node(registry, beats=1)
    add_node(registry, public=False, gpu=True, models={"a": "ready"}, labels={"zone": "1"})
    add_node(registry, public=True, gpu=True, models={"a": "ready"})
    add_node(registry, public=True, gpu=False, models={"a": "ready"}, labels={"zone": "1"})
    add_node(registry, public=True, gpu=True, models={"b": "ready"}, labels={"zone": "1"})
    add_node(registry, public=True, gpu=True, models={"a": "ready"}, labels={"zone": "1"}, usage=(95, 0, 0))
    fill(r, jobs.keys, add_node(registry, public=True, gpu=True, models={"a": "ready"}, labels={"zone": "1"}), 1)
    # cordoned with every slot taken: NodeCordoned comes first
    cordoned = add_node(registry, public=True, gpu=True, models={"a": "ready"}, labels={"zone": "1"})
    registry.cordon(cordoned, "operator", "firmware")
    r.hset(jobs.keys.assigned(cordoned), "filler", "{}")
    add_node(registry, public=True, gpu=True, models={"a": "ready"}, labels={"zone": "1"})
    needs = JobNeeds(("a",), True, True, (("zone", "1"),))
    eligible, total, walked = jobs.dispatcher.explain(needs)
    assert (eligible, total) == (1, 9)
    noted = jobs.dispatcher.note_waiting("j-1", needs)
    assert noted is not None and (noted.eligible, noted.total) == (1, 9)
    assert noted.exclusions == walked, "the same counts, and each reason's one node as its example"
    assert walked["counts"] == {reason: 1 for reason in tuple(Exclusion)}, "one node fails each step"
    meta = json.loads(r.get(jobs.keys.celery_result("j-1")))
    assert meta["status"] == "WAITING"
    assert {k: meta["result"][k] for k in ("eligible", "total", "exclusions", "examples")} == {
        "eligible": 1, "total": 9, "exclusions": walked["counts"], "examples": walked["examples"]}


def test_a_pass_over_waiting_jobs_records_its_decisions_with_examples(core: tuple[Registry, Jobs],
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Each pass records, for the first job of each kind it leaves waiting, the counts and
    examples (in the log, /api/stats and the job's WAITING state), not only submissions."""
    registry, jobs = core
    jobs.clock = lambda: T0 + 9_500
    jobs.dispatcher.clock = jobs.clock
    assert jobs.submit("j-1", {"job_type": "t", "required_models": ["a"]}).outcome == "waiting"
    jobs.dispatcher.flush()
    before = jobs.dispatcher.stats()["decisions"]["waiting"]
    lacking = add_node(registry, models={"b": "ready"})
    caplog.set_level("INFO", logger="dispatcher.dispatch")
    assert jobs.dispatch_waiting() == 0
    stats = jobs.dispatcher.stats()
    assert stats["decisions"]["waiting"] == before + 1, "the pass's decision is counted"
    assert stats["examples"]["ModelNotAvailable"] == [lacking]
    logged = [r for r in caplog.records if getattr(r, "event", None) == "dispatch_decision"]
    assert [(r.job_id, r.outcome, r.examples) for r in logged] == [  # type: ignore[attr-defined]
        ("j-1", "waiting", {"ModelNotAvailable": [lacking]})], "the pass's decision is logged, with examples"
    meta = json.loads(jobs.client.get(jobs.keys.celery_result("j-1")))["result"]
    assert (meta["eligible"], meta["total"], meta["examples"]) == (0, 1, {"ModelNotAvailable": [lacking]})


def test_the_least_loaded_node_wins(core: tuple[Registry, Jobs], r: redis.Redis) -> None:
    """Load is assigned jobs over max_concurrent_jobs, the server's own count; usage
    only rules a node out at the resource threshold."""
    registry, jobs = core
    keys = jobs.keys
    half_full = add_node(registry, max_jobs=2, usage=(1, 1, 1))
    fill(r, keys, half_full, 1)
    quarter_full = add_node(registry, max_jobs=4, usage=(60, 0, 0))
    fill(r, keys, quarter_full, 1)
    third_full = add_node(registry, max_jobs=3, usage=(1, 0, 0))
    fill(r, keys, third_full, 1)
    assert jobs.submit("j-1", {"job_type": "t"}).node_id == quarter_full
    assert jobs.submit("j-2", {"job_type": "t"}).node_id == third_full  # quarter_full now holds 2 of 4


def test_equal_nodes_take_turns(core: tuple[Registry, Jobs]) -> None:
    registry, jobs = core
    nodes = {add_node(registry, max_jobs=10) for _ in range(3)}
    chosen = [jobs.submit(f"j-{i}", {"job_type": "t"}).node_id for i in range(3)]
    assert set(chosen) == nodes, "same load and usage: each one in turn"


def test_a_job_is_assigned_once_even_when_submitted_twice(core: tuple[Registry, Jobs], r: redis.Redis) -> None:
    registry, jobs = core
    node = add_node(registry, max_jobs=5)
    assert jobs.submit("j-1", {"job_type": "t"}).node_id == node
    assert jobs.submit("j-1", {"job_type": "t"}) is None, "a redelivered submit_job changes nothing"
    assert r.hlen(jobs.keys.assigned(node)) == 1 and r.llen(jobs.keys.queue(node)) == 3  # status, status, job


def test_a_cordoned_node_keeps_its_status_and_its_jobs_and_gets_no_new_one(core: tuple[Registry, Jobs],
                                                                            r: redis.Redis) -> None:
    registry, jobs = core
    keys = jobs.keys
    node = add_node(registry, max_jobs=3)
    assert jobs.submit("j-1", {"job_type": "t"}).node_id == node
    assert registry.cordon(node, "alice", "fan noise") == "ready"
    assert r.hget(keys.node(node), "status") == "ready" and r.zscore(keys.capacity_index(), node) is None
    waiting = jobs.submit("j-2", {"job_type": "t"})
    assert waiting.outcome == "waiting" and waiting.exclusions["counts"] == {"NodeCordoned": 1}
    assert waiting.exclusions["examples"] == {"NodeCordoned": [node]}
    assert JobViews(jobs).eligibility(node, JobNeeds())["first_failure"] == "NodeCordoned"
    # a status change back to ready (a drain called off) keeps it out of the capacity index
    assert registry.drain(node, "bob", "maybe").status == "draining"
    assert registry.undrain(node, "bob") == "ready"
    assert r.zscore(keys.capacity_index(), node) is None and r.hget(keys.node(node), "cordoned") == "1"
    # the job it has ends: the freed slot stays closed
    frame = {"type": "job_result", "job_id": "j-1", "attempt": 1, "success": True, "output": 1}
    assert apply_result(jobs, node, decode_node_message(json.dumps(frame))) == "succeeded"
    assert r.zscore(keys.capacity_index(), node) is None and jobs.dispatch_waiting() == 0
    jobs.submit("j-3", {"job_type": "t", "priority": 9})
    assert registry.uncordon(node, "alice") == "ready"
    assert r.zscore(keys.capacity_index(), node) is not None and not r.sismember(keys.cordoned(), node)
    assert jobs.dispatch_waiting() == 2, "both waiting jobs go to it at once"
    assert registry.uncordon(node, "alice") == "ready", "uncordoning an uncordoned node changes nothing"


# Each step fails on its own now and then (and edge values sit on both sides of
# each limit), so every step gets its turn as the first to fail.
often = [True] * 6 + [False] * 2
node_strategy = st.fixed_dictionaries({
    "beats": st.sampled_from([3] * 7 + [1]),  # 3: ready; 1: still registering
    "silent_ms": st.sampled_from([0] * 6 + [44_999, 45_000]),
    "models": st.fixed_dictionaries({"a": st.sampled_from(["ready"] * 3 + ["loading"])}),
    "labels": st.sampled_from([{"zone": "1"}] * 3 + [{"zone": "2"}, {}]),
    "public": st.sampled_from(often),
    "gpu": st.sampled_from(often),
    "gpu_available": st.sampled_from(often),
    "max_jobs": st.integers(1, 2),
    "assigned": st.sampled_from([0, 0, 0, 1, 2]),
    "cpu": st.sampled_from([0.0] * 4 + [79.9, 80.0, 99.0]),
    "cordoned": st.sampled_from(often),
})
job_strategy = st.fixed_dictionaries({
    "required_models": st.sampled_from([[], ["a"]]),
    "require_gpu": st.booleans(),
    "public": st.booleans(),
    "node_selector": st.sampled_from([{}, {"zone": "1"}]),
})


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(node=node_strategy, job=job_strategy)
def test_the_script_and_the_explanation_agree_on_every_node(core: tuple[Registry, Jobs], r: redis.Redis,
                                                            node: dict[str, Any], job: dict[str, Any]) -> None:
    """For any node and job, the Lua filter (which decides) and the Python filter
    (which explains failures and answers "why not this node") give the same verdict."""
    forget_everything(r)
    registry, jobs = core
    keys = jobs.keys
    node_id = add_node(registry, beats=node["beats"], last_beat_ms=T0 + 10_000 - node["silent_ms"],
                       models=node["models"], labels=node["labels"], public=node["public"], gpu=node["gpu"],
                       gpu_available=node["gpu_available"], max_jobs=node["max_jobs"], usage=(node["cpu"], 0, 0))
    if node["beats"] == 0:
        r.hset(keys.node(node_id), "last_seen_ms", T0 + 10_000 - node["silent_ms"])
    fill(r, keys, node_id, node["assigned"])
    if not node["cordoned"]:  # ("often" True: cordoned now and then)
        registry.cordon(node_id, "operator", "maintenance")
    stored = dict(zip(NODE_FIELDS, r.hmget(keys.node(node_id), NODE_FIELDS), strict=True))
    needs = JobNeeds(tuple(job["required_models"]), job["require_gpu"], job["public"],
                     tuple(sorted(job["node_selector"].items())))
    expected = first_failure(evaluate(stored, node["assigned"], needs, T0 + 10_000, 45_000, 80))
    event(expected.reason if expected else "eligible")

    reply = jobs.scripts.submit_job("j", needs.kind, T0 + 10_000, 0, {
        "job_type": "t", "payload": "{}", "required_models": json.dumps(job["required_models"]),
        "require_gpu": job["require_gpu"], "public": job["public"], "timeout_seconds": 1, "timeout_ms": 1000,
        "max_attempts": 1, "dispatch_timeout_ms": 1000, "priority": 5,
        "node_selector": json.dumps(job["node_selector"]), "needs": needs.to_json()},
        jobs.dispatcher.search(needs))
    if expected is None:
        assert isinstance(reply, Assigned), (stored, job, reply)
        return
    assert isinstance(reply, Waiting), (stored, job, expected, reply)
    assert expected.reason in tuple(Exclusion)
    # The script names the reason of a node it looked at (one the indexes let through); the
    # indexes, which count a waiting job's exclusions, name it too (silence aside: the scan's).
    assert reply.exclusions["counts"] in ({}, {expected.reason: 1}), (stored, job, expected)
    noted = jobs.dispatcher.note_waiting("j", needs)
    assert noted is not None and noted.total == 1
    counted = noted.exclusions
    if node["silent_ms"] >= 45_000 and expected.reason == "StatusNotReady":
        assert sum(counted["counts"].values()) <= 1, counted  # the indexes see the silent node as ready
    else:
        assert counted == {"counts": {expected.reason: 1}, "examples": {expected.reason: [node_id]}}, (
            stored, job, expected, counted)


def test_indexes_find_every_eligible_node(core: tuple[Registry, Jobs], r: redis.Redis) -> None:
    registry, jobs = core
    wanted = {add_node(registry, models={"a": "ready"}, labels={"zone": "1"}, public=True, gpu=True)
              for _ in range(4)}
    add_node(registry, models={"a": "loading"}, labels={"zone": "1"}, public=True, gpu=True)
    add_node(registry, models={"a": "ready"}, labels={"zone": "2"}, public=True, gpu=True)
    add_node(registry, models={"a": "ready"}, labels={"zone": "1"}, public=False, gpu=True)
    add_node(registry, models={"a": "ready"}, labels={"zone": "1"}, public=True, gpu=False)
    add_node(registry, models={"a": "ready"}, labels={"zone": "1"}, public=True, gpu=True, usage=(90, 0, 0))
    for _ in range(70):  # less loaded than the wanted ones, lacking the model: past the search's page budget
        add_node(registry, gpu=True, public=True, labels={"zone": "1"}, max_jobs=100)
    spec = {"job_type": "t", "required_models": ["a"], "require_gpu": True, "public": True,
            "node_selector": {"zone": "1"}}
    decisions = [jobs.submit(f"j{i}", spec) for i in range(5)]
    assert {d.node_id for d in decisions[:4]} == wanted
    assert decisions[4].outcome == "waiting"
