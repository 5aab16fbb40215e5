"""The frames the Lua scripts build (with cjson, or by hand) are frames the node's agent
accepts: every one a script queues for a node's session is validated with the agent's
decoder, ``decode_server_message``, which refuses a field its model would not take, and
must carry no field its model does not know.

The real scripts run on the session's Redis, driven through the core (Registry, Jobs,
Recovery) with an injected clock; after each script call the node queues are read and
emptied, so that every frame is told apart by the script that queued it. What each
script queues (``QUEUED_BY``, checked exactly at the end):

- ``node_status`` (lua/_node.lua ``transition``): register_node, record_heartbeat,
  expire_warmup, expire_node, close_session, drain_node, undrain_node, expire_drain; and the
  job scripts that move their node: complete_job and release_job (a JobFailures
  degradation, a drain's last job), cancel_job (a drain's last job);
- ``job_assign`` (lua/_job.lua ``assign``, built by hand around the payload): submit_job,
  dispatch_job, and register_node when a node resumes (its assignments again);
- ``job_cancel`` (lua/_nodejob.lua ``stop_on_node``): cancel_job, release_job, and
  register_node when a node resumes (the cancels it may have missed);
- ``!close <code> <reason>`` (lua/_node.lua ``end_session``), an instruction for the web
  process, never sent to the node: expire_node, undrain_node. Checked with
  ``parse_control``: the verb ``close`` and a ``CloseCode``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pytest
import redis

from dispatcher.delivery import CONTROL_PREFIX, parse_control
from dispatcher.jobs import Jobs
from dispatcher.keys import Keys
from dispatcher.messages import NodeHeartbeat, NodeRegister, decode_node_message, decode_server_message
from dispatcher.recovery import Recovery
from dispatcher.registry import Registration, Registry
from dispatcher.scripts import Scripts
from dispatcher.vocabulary import CloseCode, NodeStatus
from tests.conftest import client_app
from tests.support import apply_result

PREFIX = "{frametest}"
T0 = 1_800_000_000_000
CLOSE = "!close"

#: The kinds of frame each script queues (see the module's docstring).
QUEUED_BY: dict[str, set[str]] = {
    "register_node": {"node_status", "job_assign", "job_cancel"},
    "record_heartbeat": {"node_status"},
    "expire_warmup": {"node_status"},
    "expire_node": {"node_status", CLOSE},
    "close_session": {"node_status"},
    "drain_node": {"node_status"},
    "undrain_node": {"node_status", CLOSE},
    "expire_drain": {"node_status"},
    "submit_job": {"job_assign"},
    "dispatch_job": {"job_assign"},
    "cancel_job": {"job_cancel", "node_status"},
    "complete_job": {"node_status"},
    "release_job": {"job_cancel", "node_status"},
}

#: A payload a decode-and-encode would change ([] and {} alike to Lua): it reaches the node as submitted.
PAYLOAD = {"audio": [1, 2.5, []], "empty": {}, "text": "ünïcode \"quoted\"", "big": 12345678901234567890}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class Frames:
    """Reads and empties every node's queue after each script call, validating what it finds."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys
        #: Script name -> the kinds of frame it queued.
        self.seen: dict[str, set[str]] = defaultdict(set)
        #: Every node frame read, parsed, in order.
        self.read: list[dict[str, Any]] = []

    def watch(self, scripts: Scripts, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in (n for n in dir(Scripts) if not n.startswith("_") and callable(getattr(Scripts, n))):
            real = getattr(scripts, name)

            def after(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
                try:
                    return _real(*args, **kwargs)
                finally:
                    self.take(_name)
            monkeypatch.setattr(scripts, name, after)

    def take(self, script: str) -> None:
        for node_id in self.r.zrange(self.keys.nodes(), 0, -1):
            pipe = self.r.pipeline()
            pipe.lrange(self.keys.queue(node_id), 0, -1)
            pipe.delete(self.keys.queue(node_id))
            queued, _ = pipe.execute()
            for text in queued:
                self.seen[script].add(self.check(script, node_id, text))

    def check(self, script: str, node_id: str, text: str) -> str:
        if text.startswith(CONTROL_PREFIX):
            verb, code, reason = parse_control(text)
            assert (verb, code in tuple(CloseCode), bool(reason)) == ("close", True, True), (script, text)
            return CLOSE
        message = decode_server_message(text)  # raises DecodeError naming the field the model refuses
        fields = json.loads(text)
        unknown = set(fields) - set(type(message).model_fields)
        assert not unknown, f"{script} queued {message.type} with fields its model does not know: {unknown}"
        assert message.type in ("node_status", "job_assign", "job_cancel"), (script, text)
        if message.type == "node_status":
            assert fields["node_id"] == node_id, (script, text)
        self.read.append(fields)
        return message.type


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keys() -> Keys:
    return Keys(PREFIX)


@pytest.fixture
def world(make_settings: Any, r: redis.Redis, db_url: str, clock: Clock, keys: Keys,
          monkeypatch: pytest.MonkeyPatch) -> tuple[Registry, Jobs, Frames]:
    # Two node faults in a row degrade a node; warmup runs out well before the heartbeat timeout.
    settings = make_settings(key_prefix=PREFIX, job_failures_consecutive=2, job_failures_in_window=2,
                             warmup_timeout_seconds=5, heartbeat_timeout_seconds=45)
    registry = Registry(r, settings, clock=clock)
    jobs = Jobs(r, settings, client_app(db_url), clock=clock)
    frames = Frames(r, keys)
    frames.watch(registry.scripts, monkeypatch)
    frames.watch(jobs.scripts, monkeypatch)
    return registry, jobs, frames


def beat(registry: Registry, reg: Registration, clock: Clock) -> None:
    clock.now += 100
    registry.heartbeat(reg.node, NodeHeartbeat.model_validate_json(json.dumps({
        "type": "node_heartbeat", "resource_usage": {"cpu_percent": 5, "mem_percent": 5, "running_jobs": 0}})))


def join(registry: Registry, clock: Clock, name: str, secret: str | None = None, ready: bool = True) -> Registration:
    """Register node ``name`` (labelled name=<name>, so that a job can ask for it), or resume it
    with its secret; then make it ready with healthy heartbeats."""
    reg = registry.register(NodeRegister.model_validate_json(json.dumps({
        "type": "node_register", "node_id": name, "node_secret": secret, "labels": {"name": name}})),
        f"s-{name}-{clock.now}", "web-1")
    for _ in range(3 if ready else 0):
        beat(registry, reg, clock)
    return reg


def submit(jobs: Jobs, job_id: str, node: str, **fields: Any) -> None:
    """A job only node ``node`` can take."""
    jobs.submit(job_id, {"job_type": "asr", "payload": PAYLOAD, "node_selector": {"name": node}, **fields})
    assert jobs.client.hget(jobs.keys.job(job_id), "state") == "assigned", job_id


def answer(jobs: Jobs, node: str, job_id: str, attempt: int, fault: bool = False) -> None:
    frame: dict[str, Any] = {"type": "job_result", "job_id": job_id, "attempt": attempt, "success": not fault,
                             "output": {"text": "ok"}}
    if fault:
        frame["error"] = {"code": "CUDA_ERROR", "message": "boom", "retryable": False, "node_fault": True}
    assert apply_result(jobs, node, decode_node_message(json.dumps(frame))) in ("succeeded", "failed")


def status(r: redis.Redis, keys: Keys, node: str) -> str | None:
    return r.hget(keys.node(node), "status")


def test_every_frame_a_script_queues_is_one_the_agent_accepts(
        world: tuple[Registry, Jobs, Frames], r: redis.Redis, keys: Keys, clock: Clock) -> None:
    registry, jobs, frames = world
    recovery = Recovery(jobs)

    # A node registers and turns ready; a job assigned to it is cancelled; another times out
    # (its cancel), waits again and is dispatched to it again.
    a = join(registry, clock, "a")
    submit(jobs, "cancelled", "a")
    assert jobs.cancel("cancelled") == "cancelled"
    submit(jobs, "timed-out", "a", timeout_seconds=1, max_attempts=2)
    clock.now += 1_500
    assert recovery.scan(now=clock.now).timed_out == ["timed-out"]
    assert r.hget(keys.job("timed-out"), "attempt") == "2"
    # It resumes: its assignment and the cancels it may have missed are queued again.
    a = join(registry, clock, "a", secret=a.secret)
    # Drained with a job left: offline once that job ends; an undrain makes it reconnect.
    assert registry.drain("a", "operator", "maintenance").status == NodeStatus.DRAINING
    answer(jobs, "a", "timed-out", 2)
    assert status(r, keys, "a") == NodeStatus.OFFLINE
    assert registry.undrain("a", "operator") == NodeStatus.OFFLINE

    # Undrained while draining; drained again, and its last job is cancelled.
    join(registry, clock, "b")
    submit(jobs, "on-b", "b")
    registry.drain("b", "operator", "maintenance")
    assert registry.undrain("b", "operator") == NodeStatus.READY
    registry.drain("b", "operator", "maintenance")
    jobs.cancel("on-b")
    assert status(r, keys, "b") == NodeStatus.OFFLINE

    # Degraded for JobFailures: by its results, and by its timeouts.
    join(registry, clock, "c")
    for i in range(2):
        submit(jobs, f"fault-{i}", "c")
        answer(jobs, "c", f"fault-{i}", 1, fault=True)
    assert status(r, keys, "c") == NodeStatus.DEGRADED
    join(registry, clock, "d")
    for i in range(2):
        submit(jobs, f"silence-{i}", "d", timeout_seconds=1, max_attempts=1)
        clock.now += 1_500
        assert recovery.scan(now=clock.now).timed_out == [f"silence-{i}"]
    assert status(r, keys, "d") == NodeStatus.DEGRADED

    # A drain deadline passes with a job left, which is taken back (its cancel).
    join(registry, clock, "e")
    submit(jobs, "at-deadline", "e")
    registry.drain("e", "operator", "maintenance", deadline_s=1)
    clock.now += 1_500
    assert registry.scan(now=clock.now).drains_ended == ["e"]
    assert recovery.scan(now=clock.now).released_from_lost_nodes == ["at-deadline"]

    # A session ends; a node never healthy runs out of warmup; then every live node falls silent.
    f = join(registry, clock, "f")
    registry.close_session("f", f.node.session_id)
    join(registry, clock, "g", ready=False)
    clock.now += 6_000
    assert registry.scan(now=clock.now).warmup_degraded == ["g"]
    clock.now += 50_000
    assert sorted(registry.scan(now=clock.now).expired) == ["c", "d", "g"]

    frames.take("(none)")
    assert not frames.seen.pop("(none)", None), "every frame was queued by a script call"
    assert dict(frames.seen) == QUEUED_BY
    assigned = [f for f in frames.read if f["type"] == "job_assign"]
    assert all(f["payload"] == PAYLOAD for f in assigned), "the payload reaches the node exactly as submitted"


def test_a_frame_the_agent_would_refuse_fails_the_check(r: redis.Redis, keys: Keys) -> None:
    """The check itself: a frame with a field its model refuses, or one it does not know."""
    frames = Frames(r, keys)
    with pytest.raises(ValueError, match="attempt"):
        frames.check("x", "n", json.dumps({"type": "job_cancel", "job_id": "j", "attempt": 0, "reason": ""}))
    with pytest.raises(AssertionError, match="does not know"):
        frames.check("x", "n", json.dumps({"type": "job_cancel", "job_id": "j", "attempt": 1, "extra": 1}))
