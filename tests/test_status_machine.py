"""Every transition of the contract's status table, through the real scripts.

Time is injected (``now=``), so timeouts need no sleeping.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from dispatcher.errors import InvalidTransition, UnknownNode
from dispatcher.keys import Keys
from dispatcher.registry import Registry
from tests.support import T0, assert_consistent, beat, make_ready, register


def status(r: redis.Redis, keys: Keys, node_id: str) -> str:
    return r.hget(keys.node(node_id), "status")


@pytest.fixture
def strict(make_settings: Any, r: redis.Redis) -> Registry:
    """A registry that requires the whisper model, and no GPU."""
    return Registry(r, make_settings(required_models=["whisper"]))


def test_registration_starts_registering(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict, installed_models=[{"model_id": "whisper", "status": "loading"}])
    assert reg.status == "registering"
    assert status(r, keys, reg.node.node_id) == "registering"
    assert_consistent(r, keys)


def test_ready_after_three_consecutive_healthy_heartbeats(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    results = [beat(strict, reg, T0 + i * 1000, {"whisper": "ready"}).outcome for i in (1, 2, 3)]
    assert [o.status for o in results] == ["registering", "registering", "ready"]
    assert results[2].transitioned and results[2].reason == "3 consecutive healthy heartbeats"
    assert_consistent(r, keys)


def test_an_unhealthy_heartbeat_restarts_the_count(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    for i, state in enumerate(["ready", "ready", "loading", "ready", "ready"], start=1):
        beat(strict, reg, T0 + i * 1000, {"whisper": state})
    assert status(r, keys, reg.node.node_id) == "registering"
    beat(strict, reg, T0 + 6000, {"whisper": "ready"})
    assert status(r, keys, reg.node.node_id) == "ready"


def test_warmup_timeout_degrades_through_a_heartbeat(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    assert beat(strict, reg, T0 + 59_999, {"whisper": "loading"}).outcome.status == "registering"
    outcome = beat(strict, reg, T0 + 60_000, {"whisper": "loading"}).outcome
    assert outcome.status == "degraded"
    assert "warmup timeout" in outcome.reason and "whisper is loading" in outcome.reason
    assert_consistent(r, keys)


def test_warmup_timeout_degrades_through_the_scan(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    quiet = register(strict, now=T0)
    healthy_so_far = register(strict, now=T0)
    beat(strict, quiet, T0 + 50_000, {"whisper": "downloading"})
    beat(strict, healthy_so_far, T0 + 50_000, {"whisper": "ready"})
    assert strict.scan(now=T0 + 59_999).warmup_degraded == []
    summary = strict.scan(now=T0 + 60_000)
    assert summary.warmup_degraded == [quiet.node.node_id]
    assert status(r, keys, quiet.node.node_id) == "degraded"
    # healthy at its last check: still warming up, not degraded
    assert status(r, keys, healthy_so_far.node.node_id) == "registering"
    assert_consistent(r, keys)


def test_ready_to_degraded_after_three_consecutive_failures(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    now = make_ready(strict, reg)
    outcomes = [beat(strict, reg, now + i * 1000, {"whisper": "error"}).outcome for i in (1, 2, 3)]
    assert [o.status for o in outcomes] == ["ready", "ready", "degraded"]
    assert outcomes[2].reason.startswith("3 consecutive failed health checks")


def test_ready_to_degraded_on_three_failures_in_the_last_five(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    now = make_ready(strict, reg)
    pattern = ["error", "ready", "error", "ready", "error"]  # never 3 in a row
    outcomes = [beat(strict, reg, now + i * 1000, {"whisper": s}).outcome for i, s in enumerate(pattern, 1)]
    assert [o.status for o in outcomes] == ["ready"] * 4 + ["degraded"]
    assert outcomes[-1].reason.startswith("3 of the last 5 health checks failed")


def test_old_failures_slide_out_of_the_window(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    now = make_ready(strict, reg)
    pattern = ["error", "ready", "error", "ready", "ready", "ready", "error", "ready"]
    for i, state in enumerate(pattern, 1):
        assert beat(strict, reg, now + i * 1000, {"whisper": state}).outcome.status == "ready"


def test_degraded_returns_to_ready_on_one_passing_check(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    now = make_ready(strict, reg)
    for i in (1, 2, 3):
        beat(strict, reg, now + i * 1000, {"whisper": "error"})
    outcome = beat(strict, reg, now + 4000, {"whisper": "ready"}).outcome
    assert (outcome.status, outcome.previous_status, outcome.reason) == ("ready", "degraded", "health check passed")


def test_a_transition_starts_a_fresh_health_window(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    now = make_ready(strict, reg)
    for i in (1, 2, 3):
        beat(strict, reg, now + i * 1000, {"whisper": "error"})
    beat(strict, reg, now + 4000, {"whisper": "ready"})  # degraded -> ready
    # Two failures right after returning to ready: the old ones no longer count.
    beat(strict, reg, now + 5000, {"whisper": "error"})
    assert beat(strict, reg, now + 6000, {"whisper": "error"}).outcome.status == "ready"
    assert r.hget(keys.node(reg.node.node_id), "window") == "00"


def test_heartbeat_timeout_takes_any_status_offline(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    warming = register(strict, now=T0)
    ready = register(strict, now=T0)
    make_ready(strict, ready)
    assert strict.scan(now=T0 + 44_999).expired == []
    summary = strict.scan(now=T0 + 3000 + 45_000)
    assert sorted(summary.expired) == sorted([warming.node.node_id, ready.node.node_id])
    assert r.hget(keys.node(ready.node.node_id), "status_reason") == "no heartbeat for 45 s"
    assert_consistent(r, keys)


def test_session_close_takes_the_node_offline(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    make_ready(strict, reg)
    assert strict.close_session(reg.node.node_id, reg.node.session_id, now=T0 + 5000) == "ready"
    assert status(r, keys, reg.node.node_id) == "offline"
    assert strict.close_session(reg.node.node_id, reg.node.session_id, now=T0 + 6000) is None
    assert_consistent(r, keys)


def test_heartbeat_of_an_offline_node_is_refused(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    strict.scan(now=T0 + 46_000)
    result = beat(strict, reg, T0 + 47_000, {"whisper": "ready"})
    assert result.refused == "offline" and status(r, keys, reg.node.node_id) == "offline"


WEEK_MS = 7 * 24 * 3600 * 1000  # the default offline_node_retention_seconds


def traces_of(r: redis.Redis, node_id: str) -> list[str]:
    """The dispatcher's keys that name the node or hold it as a member
    (the fleet's transition log, which is history, aside)."""
    found = []
    for key in r.scan_iter(match="{dispatcher}*"):
        kind = r.type(key)
        if node_id in key or (kind == "set" and r.sismember(key, node_id)) or (
                kind == "zset" and r.zscore(key, node_id) is not None):
            found.append(key)
    return found


def test_a_node_long_gone_is_forgotten_with_every_trace(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    models = [{"model_id": "whisper", "status": "ready"}, {"model_id": "llama", "status": "loading"}]
    gone = register(strict, node_id="gone-1", labels={"rack": "a"}, installed_models=models,
                    hardware={"gpus": [{"name": "H100", "memory_gb": 80}]})
    later = register(strict, node_id="later-1", labels={"rack": "a"}, installed_models=models)
    make_ready(strict, gone)
    make_ready(strict, later, now=T0 + 5000)
    strict.close_session("gone-1", gone.node.session_id, now=T0 + 5000)
    strict.close_session("later-1", later.node.session_id, now=T0 + 9000)
    assert strict.scan(now=T0 + 5000 + WEEK_MS - 1).forgotten == []
    assert strict.scan(now=T0 + 5000 + WEEK_MS).forgotten == ["gone-1"]
    assert traces_of(r, "gone-1") == []
    assert status(r, keys, "later-1") == "offline" and traces_of(r, "later-1")
    assert_consistent(r, keys)
    again = register(strict, now=T0 + WEEK_MS + 10_000, node_id="gone-1", node_secret="the old one")
    assert not again.resumed and again.status == "registering", "a new node under the old id"


def test_an_operator_forgets_an_offline_node_and_nothing_else(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    """DELETE /api/nodes/<id>: at once for an offline node gone silent, with its secret and every
    trace (a cordon too); refused, with why, for any other."""
    reg = register(strict, node_id="old-1", labels={"rack": "a"})
    now = make_ready(strict, reg)
    strict.cordon("old-1", "operator", "broken fan", now=now)
    with pytest.raises(InvalidTransition, match="old-1 is ready: only an offline node can be forgotten"):
        strict.forget("old-1", "operator", now=now)
    assert strict.drain("old-1", "operator", "retire", now=now).status == "offline"
    with pytest.raises(InvalidTransition, match=r"its session is open .a drained node.: its agent would register"):
        strict.forget("old-1", "operator", now=now + 1000)
    r.hset(keys.assigned("old-1"), "job-1", "{}")  # not yet taken back
    strict.close_session("old-1", reg.node.session_id, now=now + 2000)
    with pytest.raises(InvalidTransition, match="still holds 1 job, sent to other nodes"):
        strict.forget("old-1", "operator", now=now + 3000)
    r.delete(keys.assigned("old-1"))
    later = now + 4000
    strict.forget("old-1", "operator", now=later)
    assert traces_of(r, "old-1") == []
    with pytest.raises(UnknownNode):
        strict.forget("old-1", "operator", now=later)
    again = register(strict, now=later, node_id="old-1", node_secret="the old one")
    assert not again.resumed, "its secret went with it: a new node under the old id"
    assert r.hget(keys.node("old-1"), "cordoned") is None
    assert_consistent(r, keys)


def test_a_drained_node_still_heartbeating_is_kept(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    now = make_ready(strict, reg)
    assert strict.drain(reg.node.node_id, "operator", "spare", now=now).status == "offline"
    seen = now + WEEK_MS
    assert beat(strict, reg, seen, {"whisper": "ready"}).refused is None
    assert strict.scan(now=seen + 1000).forgotten == []
    assert strict.scan(now=seen + WEEK_MS).forgotten == [reg.node.node_id]


def test_an_offline_node_with_a_job_assigned_is_kept(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    now = make_ready(strict, reg)
    r.hset(keys.assigned(reg.node.node_id), "job-1", "{}")  # not yet taken back
    strict.close_session(reg.node.node_id, reg.node.session_id, now=now)
    assert strict.scan(now=now + WEEK_MS).forgotten == []
    assert status(r, keys, reg.node.node_id) == "offline"
    assert_consistent(r, keys)


def test_a_zero_retention_keeps_offline_nodes_forever(make_settings: Any, r: redis.Redis, keys: Keys) -> None:
    registry = Registry(r, make_settings(offline_node_retention_seconds=0))
    reg = register(registry)
    registry.close_session(reg.node.node_id, reg.node.session_id, now=T0 + 1000)
    assert registry.scan(now=T0 + 100 * WEEK_MS).forgotten == []
    assert status(r, keys, reg.node.node_id) == "offline"


@pytest.mark.parametrize("start", ["ready", "degraded"])
def test_drain_of_an_idle_node_ends_offline_at_once(strict: Registry, r: redis.Redis, keys: Keys, start: str) -> None:
    reg = register(strict)
    now = make_ready(strict, reg)
    if start == "degraded":
        for i in (1, 2, 3):
            beat(strict, reg, now + i * 1000, {"whisper": "error"})
    assert status(r, keys, reg.node.node_id) == start
    outcome = strict.drain(reg.node.node_id, "operator alice", "maintenance", now=now + 10_000)
    assert outcome.status == "offline"
    history = [json.loads(e) for e in r.lrange(keys.node_transitions(reg.node.node_id), 0, 1)]
    assert [(h["from"], h["to"]) for h in history] == [("draining", "offline"), (start, "draining")]
    assert_consistent(r, keys)


def test_draining_node_with_jobs_goes_offline_at_its_deadline(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    now = make_ready(strict, reg)
    r.hset(keys.assigned(reg.node.node_id), "job-1", "{}")  # a job still running there
    outcome = strict.drain(reg.node.node_id, "operator", "reboot", deadline_s=30, now=now)
    assert (outcome.status, outcome.jobs_left) == ("draining", 1)
    assert strict.scan(now=now + 29_000).drains_ended == []
    assert strict.scan(now=now + 30_000).drains_ended == [reg.node.node_id]
    assert status(r, keys, reg.node.node_id) == "offline"
    assert r.zscore(keys.lost(), reg.node.node_id) is not None, "its job must go back to dispatch"


def test_only_ready_or_degraded_nodes_can_be_drained(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    with pytest.raises(InvalidTransition):
        strict.drain(reg.node.node_id, "operator", "too early", now=T0 + 1000)
    assert status(r, keys, reg.node.node_id) == "registering"


def test_undrain_returns_a_draining_node_to_service(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    now = make_ready(strict, reg)
    r.hset(keys.assigned(reg.node.node_id), "job-1", "{}")
    strict.drain(reg.node.node_id, "operator", "maybe", now=now)
    assert strict.undrain(reg.node.node_id, "operator", now=now + 1000) == "ready"
    assert r.zscore(keys.drains(), reg.node.node_id) is None
    assert_consistent(r, keys)


def test_heartbeats_while_draining_change_no_status(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    now = make_ready(strict, reg)
    r.hset(keys.assigned(reg.node.node_id), "job-1", "{}")
    strict.drain(reg.node.node_id, "operator", "maintenance", now=now)
    for i in range(1, 5):
        assert beat(strict, reg, now + i * 1000, {"whisper": "error"}).outcome.status == "draining"


def test_every_transition_is_queued_for_the_node(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    make_ready(strict, reg)
    frames = [json.loads(f) for f in r.lrange(keys.queue(reg.node.node_id), 0, -1)]
    assert [(f["type"], f["previous_status"], f["status"]) for f in frames] == [
        ("node_status", None, "registering"), ("node_status", "registering", "ready")]
    assert all(isinstance(f["timestamp"], int) and f["node_id"] == reg.node.node_id for f in frames)


def test_liveness_uses_the_server_clock_not_the_node_timestamp(strict: Registry, r: redis.Redis, keys: Keys) -> None:
    reg = register(strict)
    # The node claims a time far in the future; the server's clock says it has been silent.
    beat(strict, reg, T0 + 1000, {"whisper": "ready"}, timestamp=T0 + 10**9)
    assert strict.scan(now=T0 + 1000 + 45_000).expired == [reg.node.node_id]


def test_gpu_rule_when_required(make_settings: Any, r: redis.Redis, keys: Keys) -> None:
    registry = Registry(r, make_settings(require_gpu=True))
    no_gpu = register(registry)
    with_gpu = register(registry, hardware={"gpus": [{"name": "H100", "memory_gb": 80}]})
    for i in (1, 2, 3):
        beat(registry, no_gpu, T0 + i * 1000)
        result = beat(registry, with_gpu, T0 + i * 1000, gpu_available=(i != 2))
    assert status(r, keys, no_gpu.node.node_id) == "registering"
    assert r.hget(keys.node(no_gpu.node.node_id), "last_health_reason") == "no GPU"
    assert result.verdict.healthy and status(r, keys, with_gpu.node.node_id) == "registering"
    for i in (4, 5, 6):
        beat(registry, with_gpu, T0 + i * 1000)  # gpu_available absent: the last value (true) stands
    assert status(r, keys, with_gpu.node.node_id) == "ready"
