"""A job's end, with an injected clock: Celery's state written with our record, a
result that comes after the timeout took the attempt back, one that came in time
but was not applied yet, a final state never overwritten."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import redis

from dispatcher.completions import CLAIM_IDLE_MS, Completions, unapplied
from dispatcher.jobs import Jobs
from dispatcher.keys import Keys
from dispatcher.localrun.redis_server import LocalRedis
from dispatcher.messages import decode_node_message
from dispatcher.recovery import Recovery
from dispatcher.registry import Registry
from tests.support import T0, add_node, apply_result, client_app, job_attempts


@pytest.fixture
def world(tmp_path: Path, make_settings: Any) -> Iterator[tuple[Registry, Jobs, redis.Redis]]:
    server = LocalRedis(tmp_path / "redis", append_only=False).start()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    settings = make_settings(redis_url=server.url)
    clock = lambda: T0 + 10_000  # noqa: E731
    yield Registry(client, settings, clock=clock), Jobs(client, settings, client_app(server.url), clock=clock), client
    client.close()
    server.stop()


def result(jobs: Jobs, node_id: str, job_id: str, attempt: int = 1) -> str:
    frame = {"type": "job_result", "job_id": job_id, "attempt": attempt, "success": True, "output": {"n": 7}}
    return apply_result(jobs, node_id, decode_node_message(json.dumps(frame)))


def celery_state(r: redis.Redis, job_id: str) -> str | None:
    meta = r.get(f"celery-task-meta-{job_id}")
    return json.loads(meta)["status"] if meta else None


def test_the_celery_result_is_written_with_the_record(world: tuple[Registry, Jobs, redis.Redis],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Our record and Celery's state change in one script: a process that dies right
    after it (nothing else of the publisher runs) leaves the client its result."""
    registry, jobs, r = world
    node_id = add_node(registry)
    jobs.submit("j", {"job_type": "asr"})
    monkeypatch.setattr(jobs.publisher, "finished", lambda *a, **k: None)  # dies before telling Flower
    assert result(jobs, node_id, "j") == "succeeded"
    meta = json.loads(r.get("celery-task-meta-j"))
    assert (meta["status"], meta["result"], meta["task_id"]) == ("SUCCESS", {"n": 7}, "j") and meta["date_done"]
    assert 0 < r.ttl("celery-task-meta-j") <= 24 * 3600


def test_a_result_after_the_timeout_took_the_attempt_back_is_stale(world: tuple[Registry, Jobs, redis.Redis]) -> None:
    registry, jobs, r = world
    node_id = add_node(registry)
    jobs.submit("j", {"job_type": "asr", "timeout_seconds": 1, "max_attempts": 1})
    assert Recovery(jobs).scan(now=T0 + 60_000).timed_out == ["j"]
    assert result(jobs, node_id, "j") == "stale"
    assert r.hget(Keys().job("j"), "state") == "failed" and celery_state(r, "j") == "FAILURE"
    assert [a["outcome"] for a in job_attempts(r, "j")] == ["failed"]
    assert r.hlen(Keys().assigned(node_id)) == 0


def test_a_result_handed_on_in_time_beats_the_timeout(world: tuple[Registry, Jobs, redis.Redis]) -> None:
    """The web process handed the result on before the deadline; no worker applied it
    (none running, or one killed holding it): the scan applies it before it looks at
    deadlines, and the job succeeds instead of being timed out and run again."""
    registry, jobs, r = world
    node_id = add_node(registry, max_jobs=2)
    jobs.submit("fresh", {"job_type": "asr", "timeout_seconds": 1})
    jobs.submit("held", {"job_type": "asr", "timeout_seconds": 1})
    for job_id in ("fresh", "held"):
        frame = {"type": "job_result", "job_id": job_id, "attempt": 1, "success": True, "output": {"n": 7}}
        assert jobs.report_result(node_id, decode_node_message(json.dumps(frame)))  # type: ignore[arg-type]
    assert unapplied(r, jobs.keys.results()) == 2, "read by no worker"
    dead = Completions(jobs, "a-worker-killed-after-reading")
    assert [fields["job_id"] for _, fields in dead.read(None)[:1]] == ["fresh"]
    assert unapplied(r, jobs.keys.results()) == 2, "one held by a worker, one read by none"
    time.sleep(CLAIM_IDLE_MS / 1000 + 0.1)
    summary = Recovery(jobs).scan(now=T0 + 60_000)
    assert summary.results_applied == 2 and summary.timed_out == []
    assert [celery_state(r, j) for j in ("fresh", "held")] == ["SUCCESS", "SUCCESS"]
    assert r.xpending(jobs.keys.results(), "completers")["pending"] == 0
    assert unapplied(r, jobs.keys.results()) == 0
    assert r.xlen(jobs.keys.results()) <= 1, "what every worker is done with is trimmed"
    consumers = {c["name"] for c in r.xinfo_consumers(jobs.keys.results(), "completers")}
    assert "a-worker-killed-after-reading" in consumers, "a worker gone a short while is still known"
    with mock.patch("dispatcher.completions.GONE_CONSUMER_IDLE_MS", 0):  # as if ten minutes had passed
        Recovery(jobs).scan(now=T0 + 61_000)
    consumers = {c["name"] for c in r.xinfo_consumers(jobs.keys.results(), "completers")}
    assert "a-worker-killed-after-reading" not in consumers, "a worker gone for long is forgotten"


def test_a_final_state_is_never_overwritten(world: tuple[Registry, Jobs, redis.Redis]) -> None:
    registry, jobs, r = world
    node_id = add_node(registry)
    jobs.submit("j", {"job_type": "asr"})
    assert result(jobs, node_id, "j") == "succeeded"
    ack = decode_node_message(json.dumps({"type": "job_progress", "job_id": "j", "attempt": 1, "progress": 0.5}))
    assert jobs.ack(node_id, ack) is None, "a late frame of a finished job is stale"  # type: ignore[arg-type]
    assert jobs.cancel("j") == "succeeded"
    assert celery_state(r, "j") == "SUCCESS"
