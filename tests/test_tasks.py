"""The Celery task layer in this process: the project's real app (``dispatcher.celery_app``)
run by Celery's embedded worker (``celery_session_worker`` from ``celery.contrib.pytest``,
completion bootstep included) on the session's real Redis, in a database of its own.

Nodes are played through the calls a web process makes for a session: the registry for
registration and heartbeats, the node's queue for what it is sent, ``Jobs.ack`` and
``Jobs.report_result`` for its answers. A result reaches the client the production way:
through the results stream to the worker's completion loop and Celery's result backend.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import TaskRevokedError
from celery.result import AsyncResult

from dispatcher.clock import now_ms
from dispatcher.delivery import Outbox
from dispatcher.jobs import Jobs
from dispatcher.keys import Keys
from dispatcher.messages import decode_node_message
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.support import wait_for

#: Every task of the layer is done well within this (the embedded worker runs one at a time).
TASK_S = 5


class Node:
    """A ready node, spoken for as its web session would."""

    def __init__(self, registry: Registry, jobs: Jobs, max_jobs: int = 1, **fields: Any) -> None:
        self.registry, self.jobs = registry, jobs
        self.session = f"session-{uuid.uuid4()}"
        register = {"type": "node_register", "max_concurrent_jobs": max_jobs,
                    "installed_models": [{"model_id": "whisper", "status": "ready"}], **fields}
        self.node = registry.register(decode_node_message(json.dumps(register)), self.session, "web-1").node
        self.node_id = self.node.node_id
        self.outbox = Outbox(registry.client, registry.scripts, registry.keys)
        self.received: list[dict[str, Any]] = []
        for _ in range(registry.settings.health_check_success_threshold):
            self.beat()
        assert self.status() == "ready"

    def beat(self, now: int | None = None) -> None:
        frame = {"type": "node_heartbeat", "resource_usage": {"cpu_percent": 5, "gpu_percent": 1, "mem_percent": 10}}
        self.registry.heartbeat(self.node, decode_node_message(json.dumps(frame)), now=now)  # type: ignore[arg-type]

    def status(self) -> str | None:
        return self.registry.client.hget(self.registry.keys.node(self.node_id), "status")

    def expect(self, kind: str, **fields: Any) -> dict[str, Any]:
        """The first frame of this kind (and these values) the node is sent, taken off its queue."""
        def found() -> dict[str, Any] | None:
            self.received += [json.loads(f) for f in self.outbox.pop(self.node_id, self.session, 1 << 20) or []]
            match = [f for f in self.received if f["type"] == kind and fields.items() <= f.items()]
            if match:
                self.received.remove(match[0])
            return match[0] if match else None
        return wait_for(found, TASK_S, what=f"{kind} {fields} for {self.node_id}")

    def sent(self, kind: str) -> list[dict[str, Any]]:
        self.received += [json.loads(f) for f in self.outbox.pop(self.node_id, self.session, 1 << 20) or []]
        return [f for f in self.received if f["type"] == kind]

    def take_job(self, **fields: Any) -> dict[str, Any]:
        job = self.expect("job_assign", **fields)
        ack = {"type": "job_ack", "job_id": job["job_id"], "attempt": job["attempt"]}
        assert self.jobs.ack(self.node_id, decode_node_message(json.dumps(ack))) is not None  # type: ignore[arg-type]
        return job

    def answer(self, job: dict[str, Any], success: bool = True, output: Any = None,
               error: dict[str, Any] | None = None) -> bool:
        """Whether the result was handed on to the workers (not when it cannot be the job's)."""
        frame = {"type": "job_result", "job_id": job["job_id"], "attempt": job["attempt"], "success": success,
                 "output": output, "error": error}
        return self.jobs.report_result(self.node_id, decode_node_message(json.dumps(frame)))  # type: ignore[arg-type]


@pytest.fixture
def world(celery_session_worker: Any, celery_session_app: Celery, r: redis.Redis,
          settings: Settings) -> Iterator[tuple[Registry, Jobs]]:
    """The node side (the web process's objects), on the worker's database (``r``)."""
    assert settings.redis_url == celery_session_app.conf.broker_url
    yield Registry(r, settings), Jobs(r, settings, celery_session_app)


def submit(app: Celery, **fields: Any) -> AsyncResult:
    """As a client submits: by the contract's task name."""
    spec = {"job_type": "asr", "payload": {"audio_url": "s3://a.wav"}, **fields}
    return app.send_task("dispatcher.submit_job", kwargs=spec, task_id=f"job-{uuid.uuid4()}")


def call(app: Celery, name: str, **kwargs: Any) -> Any:
    return app.send_task(name, kwargs=kwargs).get(timeout=TASK_S)


def job_state(r: redis.Redis, job_id: str) -> str | None:
    return r.hget(Keys().job(job_id), "state")


def test_submit_job_reaches_a_node_and_the_completion_returns_its_output(
        world: tuple[Registry, Jobs], celery_session_app: Celery, r: redis.Redis) -> None:
    node = Node(*world)
    result = submit(celery_session_app, required_models=["whisper"], payload={"audio": [1, 2.5], "empty": {}})
    job = node.take_job()
    assert (job["job_id"], job["attempt"], job["payload"]) == (result.id, 1, {"audio": [1, 2.5], "empty": {}})
    wait_for(lambda: result.state == "STARTED", TASK_S, what="STARTED after the ack")
    assert result.info == {"node_id": node.node_id, "attempt": 1}
    node.answer(job, output={"text": "hello", "none": None})
    assert result.get(timeout=TASK_S) == {"text": "hello", "none": None}
    assert job_state(r, result.id) == "succeeded"
    assert r.hlen(Keys().assigned(node.node_id)) == 0, "the completion freed the slot"


@pytest.mark.parametrize(("fields", "named"), [
    ({"payload": {}}, "job_type"),
    ({"job_type": "asr", "priority": 12}, "priority"),
    ({"job_type": "asr", "colour": "blue"}, "colour"),
])
def test_submit_job_refuses_invalid_fields_naming_the_field(world: tuple[Registry, Jobs], celery_session_app: Celery,
                                                            r: redis.Redis, fields: dict[str, Any], named: str) -> None:
    result = celery_session_app.send_task("dispatcher.submit_job", kwargs=fields)
    with pytest.raises(Exception, match=named) as raised:
        result.get(timeout=TASK_S)
    assert type(raised.value).__name__ == "InvalidJob" and result.state == "FAILURE"
    assert not r.exists(Keys().job(result.id)), "an invalid job leaves nothing behind"


def test_a_retryable_failure_sends_the_job_back_and_the_last_one_fails_it(
        world: tuple[Registry, Jobs], celery_session_app: Celery, r: redis.Redis) -> None:
    node = Node(*world)
    result = submit(celery_session_app, max_attempts=2)
    first = node.take_job()
    node.answer(first, success=False, error={"code": "MODEL_CRASHED", "message": "CUDA OOM", "retryable": True})
    second = node.take_job(attempt=2)
    assert second["job_id"] == result.id
    node.answer(second, success=False, error={"code": "MODEL_CRASHED", "message": "again", "retryable": True})
    with pytest.raises(Exception, match="MODEL_CRASHED: again") as raised:
        result.get(timeout=TASK_S)
    assert type(raised.value).__name__ == "JobFailed" and job_state(r, result.id) == "failed"


def test_a_completion_gives_the_freed_slot_to_a_waiting_job(world: tuple[Registry, Jobs],
                                                           celery_session_app: Celery, r: redis.Redis) -> None:
    node = Node(*world, max_jobs=1)
    first = submit(celery_session_app)
    held = node.take_job()
    second = submit(celery_session_app)
    wait_for(lambda: r.zscore(Keys().waiting(), second.id) is not None, TASK_S, what="the second job waiting")
    node.answer(held, output=1)
    node.answer(node.take_job(job_id=second.id), output=2)
    assert (first.get(timeout=TASK_S), second.get(timeout=TASK_S)) == (1, 2)


def test_cancel_job_of_a_waiting_job_revokes_it(world: tuple[Registry, Jobs], celery_session_app: Celery,
                                                r: redis.Redis) -> None:
    result = submit(celery_session_app, required_models=["nobody-has-this"])
    wait_for(lambda: r.zscore(Keys().waiting(), result.id) is not None, TASK_S, what="waiting")
    assert call(celery_session_app, "dispatcher.cancel_job", job_id=result.id) == "cancelled"
    with pytest.raises(TaskRevokedError, match="cancelled by the client"):
        result.get(timeout=TASK_S)
    assert r.zscore(Keys().waiting(), result.id) is None and job_state(r, result.id) == "cancelled"


def test_cancel_job_of_a_running_job_tells_its_node_and_frees_the_slot(
        world: tuple[Registry, Jobs], celery_session_app: Celery) -> None:
    node = Node(*world, max_jobs=1)
    result = submit(celery_session_app)
    job = node.take_job()
    assert call(celery_session_app, "dispatcher.cancel_job", job_id=result.id, reason="user gave up") == "cancelled"
    cancel = node.expect("job_cancel")
    assert (cancel["job_id"], cancel["attempt"], cancel["reason"]) == (result.id, 1, "user gave up")
    with pytest.raises(TaskRevokedError, match="user gave up"):
        result.get(timeout=TASK_S)
    assert not node.answer(job, output="too late"), "a late result is dropped where it arrives"
    after = submit(celery_session_app)
    node.answer(node.take_job(job_id=after.id), output="the slot was freed")
    assert after.get(timeout=TASK_S) == "the slot was freed"
    assert result.state == "REVOKED", "a late result changes nothing"


def test_cancel_job_says_how_a_finished_job_ended_and_refuses_an_unknown_one(
        world: tuple[Registry, Jobs], celery_session_app: Celery) -> None:
    node = Node(*world)
    result = submit(celery_session_app)
    node.answer(node.take_job(), output="done")
    assert result.get(timeout=TASK_S) == "done"
    assert call(celery_session_app, "dispatcher.cancel_job", job_id=result.id) == "succeeded"
    with pytest.raises(Exception, match="no job job-unknown") as raised:
        call(celery_session_app, "dispatcher.cancel_job", job_id="job-unknown")
    assert type(raised.value).__name__ == "UnknownJob"


def test_drain_node_and_undrain_node(world: tuple[Registry, Jobs], celery_session_app: Celery,
                                     r: redis.Redis) -> None:
    idle, busy = Node(*world, labels={"who": "idle"}), Node(*world, max_jobs=2, labels={"who": "busy"})
    held = submit(celery_session_app, node_selector={"who": "busy"})
    busy.take_job()
    assert call(celery_session_app, "dispatcher.drain_node", node_id=idle.node_id, reason="maintenance") == {
        "node_id": idle.node_id, "status": "offline", "jobs_left": 0}
    assert call(celery_session_app, "dispatcher.drain_node", node_id=busy.node_id) == {
        "node_id": busy.node_id, "status": "draining", "jobs_left": 1}
    waiting = submit(celery_session_app, node_selector={"who": "busy"})
    wait_for(lambda: r.zscore(Keys().waiting(), waiting.id) is not None, TASK_S, what="no job for a draining node")
    assert call(celery_session_app, "dispatcher.undrain_node", node_id=busy.node_id) == "ready"
    busy.answer(busy.take_job(job_id=waiting.id), output="after the drain")
    assert waiting.get(timeout=TASK_S) == "after the drain" and held.state == "STARTED"
    with pytest.raises(Exception, match="no node nobody") as raised:
        call(celery_session_app, "dispatcher.drain_node", node_id="nobody")
    assert type(raised.value).__name__ == "UnknownNode"


def test_cordon_node_and_uncordon_node(world: tuple[Registry, Jobs], celery_session_app: Celery,
                                      r: redis.Redis) -> None:
    node = Node(*world, max_jobs=2, labels={"who": "c"})
    held = submit(celery_session_app, node_selector={"who": "c"})
    held_job = node.take_job(job_id=held.id)
    assert call(celery_session_app, "dispatcher.cordon_node", node_id=node.node_id, reason="bad fan") == {
        "node_id": node.node_id, "status": "ready", "cordoned": True}
    waiting = submit(celery_session_app, node_selector={"who": "c"})
    wait_for(lambda: r.zscore(Keys().waiting(), waiting.id) is not None, TASK_S, what="no job for a cordoned node")
    assert wait_for(lambda: waiting.state == "WAITING" and waiting.info, TASK_S,
                    what="why it waits")["exclusions"] == {"NodeCordoned": 1}
    assert node.status() == "ready" and r.hget(Keys().node(node.node_id), "cordon_reason") == "bad fan"
    assert call(celery_session_app, "dispatcher.uncordon_node", node_id=node.node_id) == {
        "node_id": node.node_id, "status": "ready", "cordoned": False}
    node.answer(node.take_job(job_id=waiting.id), output="after the cordon")
    assert waiting.get(timeout=TASK_S) == "after the cordon" and held.state == "STARTED"
    node.answer(held_job, output="the first job")
    assert held.get(timeout=TASK_S) == "the first job"
    with pytest.raises(Exception, match="no node nobody") as raised:
        call(celery_session_app, "dispatcher.cordon_node", node_id="nobody")
    assert type(raised.value).__name__ == "UnknownNode"


def test_scan_nodes_takes_a_silent_node_offline_and_its_job_elsewhere_after_the_grace(
        world: tuple[Registry, Jobs], celery_session_app: Celery, settings: Settings, r: redis.Redis) -> None:
    """The scan's clock is its argument: 45 s of silence pass without a sleep."""
    silent = Node(*world)
    result = submit(celery_session_app)
    silent.take_job()
    alive = Node(*world)
    timeout_ms = int(settings.heartbeat_timeout_seconds * 1000)
    later = now_ms() + timeout_ms + 1000
    alive.beat(now=later)
    celery_session_app.send_task("dispatcher.scan_nodes", kwargs={"now_ms": later})
    # The embedded worker runs one task at a time, in the order it took them: once a task sent
    # after the scan has answered, the scan is over, its jobs' part too.
    assert call(celery_session_app, "celery.ping") == "pong"
    assert silent.status() == "offline"
    assert alive.status() == "ready" and job_state(r, result.id) in ("assigned", "running"), "the grace runs"
    after_grace = later + int(settings.reassign_grace_seconds * 1000) + 1000
    alive.beat(now=after_grace)
    celery_session_app.send_task("dispatcher.scan_nodes", kwargs={"now_ms": after_grace})
    alive.answer(alive.take_job(job_id=result.id, attempt=2), output="elsewhere")
    assert result.get(timeout=TASK_S) == "elsewhere"


def test_a_cold_shutdown_stops_the_completion_loop(celery_session_app: Celery) -> None:
    """Celery's cold shutdown (and the embedded worker's end) calls ``terminate`` on each step."""
    from types import SimpleNamespace

    from dispatcher.completions import CompletionStep

    worker = SimpleNamespace(app=celery_session_app, hostname="cold@tests")
    step = CompletionStep(worker)
    step.start(worker)
    assert step._thread is not None and step._thread.is_alive()
    step.terminate(worker)
    assert not step._thread.is_alive()
