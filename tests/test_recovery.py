"""What the periodic scan recovers, with an injected clock: a result a node sent in
time stands, whatever a timeout or a lost node would say of its attempt later."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from dispatcher.jobs import Jobs
from dispatcher.keys import Keys
from dispatcher.localredis import LocalRedis
from dispatcher.messages import decode_node_message
from dispatcher.registry import Registry
from tests.conftest import client_app
from tests.test_dispatch import T0, add_node


@pytest.fixture
def world(tmp_path: Path, make_settings: Any) -> Iterator[tuple[Registry, Jobs, redis.Redis]]:
    # A Redis of its own: the completion tasks these jobs queue are never taken, as
    # when the worker that would have taken them died.
    server = LocalRedis(tmp_path / "redis", append_only=False).start()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    settings = make_settings(redis_url=server.url)
    clock = lambda: T0 + 10_000  # noqa: E731
    yield Registry(client, settings, clock=clock), Jobs(client, settings, client_app(server.url), clock=clock), client
    client.close()
    server.stop()


def result_recorded(jobs: Jobs, node_id: str, job_id: str) -> None:
    frame = {"type": "job_result", "job_id": job_id, "attempt": 1, "success": True, "output": {"n": 7}}
    assert jobs.record_result(node_id, decode_node_message(json.dumps(frame))) == "accepted"  # type: ignore[arg-type]


def test_a_result_recorded_in_time_beats_the_timeout(world: tuple[Registry, Jobs, redis.Redis]) -> None:
    registry, jobs, r = world
    node_id = add_node(registry)
    jobs.submit("j", {"job_type": "asr", "timeout_seconds": 1})
    result_recorded(jobs, node_id, "j")  # ... and its completion task is lost
    summary = jobs.scan(now=T0 + 60_000)
    assert summary.timed_out == [] and r.hget(Keys().job("j"), "state") == "succeeded"
    assert json.loads(r.hget(Keys().job("j"), "output")) == {"n": 7}
    assert [json.loads(a)["outcome"] for a in r.lrange(Keys().job_attempts("j"), 0, -1)] == ["succeeded"]


def test_a_result_recorded_before_the_node_was_lost_stands(world: tuple[Registry, Jobs, redis.Redis]) -> None:
    registry, jobs, r = world
    node_id = add_node(registry)
    jobs.submit("j", {"job_type": "asr"})
    result_recorded(jobs, node_id, "j")
    registry.close_session(node_id, "s", "session closed", now=T0 + 11_000)
    summary = jobs.scan(now=T0 + 200_000)  # past the completion stall and the reassign grace
    assert summary.released_from_lost_nodes == [] and r.hget(Keys().job("j"), "state") == "succeeded"
    assert r.hlen(Keys().assigned(node_id)) == 0
