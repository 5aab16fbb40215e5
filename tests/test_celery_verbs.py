"""Celery's own verbs act on jobs as a Celery user expects: revoke is cancel (from a
client, the CLI and Flower), a final state is never overwritten, a waiting job says
why through its task state, and ``fail_fast`` fails at once what no node could take."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import redis
from celery.exceptions import TaskRevokedError

from dispatcher.keys import Keys
from tests.support import PYTHON, clean_env, log_events, wait_for, wait_for_scans


def submit(client: Any, **fields: Any) -> Any:
    spec = {"job_type": "asr", "payload": {"audio_url": "s3://a.wav"}, **fields}
    return client.send_task("dispatcher.submit_job", kwargs=spec, task_id=f"job-{uuid.uuid4()}")


def ignored_result(system: Any, job_id: str) -> list[dict[str, Any]]:
    """The log lines of the web process or the worker saying it set a node's result of this job aside."""
    return [line for process in (system.web.process, system.worker)
            for line in log_events(process, "job_frame_ignored", job_id=job_id, ref_type="job_result")]


def test_revoking_a_running_job_cancels_it_on_its_node(system: Any, client: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = submit(client)
    job = node.take_job()
    wait_for(lambda: result.state == "STARTED", what="started")
    result.revoke()
    cancel = node.expect("job_cancel")
    assert (cancel["job_id"], cancel["attempt"]) == (job["job_id"], 1)
    assert "revoked through Celery" in cancel["reason"]
    with pytest.raises(TaskRevokedError, match="revoked through Celery"):
        result.get(timeout=10)
    node.succeed(job, "too late")
    wait_for(lambda: ignored_result(system, job["job_id"]), what="the late result set aside")
    assert result.state == "REVOKED", "a final state is never overwritten"
    second = submit(client)
    node.succeed(node.take_job(), "the slot was freed")
    assert second.get(timeout=10) == "the slot was freed"


def test_revoke_with_terminate_cancels_too(system: Any, client: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = submit(client)
    node.take_job()
    result.revoke(terminate=True, signal="KILL")
    assert "terminate, signal KILL" in node.expect("job_cancel")["reason"]
    assert result.state == "REVOKED"


def test_a_revoked_waiting_job_never_runs(system: Any, client: Any, live_nodes: Any, r: redis.Redis) -> None:
    result = submit(client, required_models=["later"])
    wait_for(lambda: result.state == "WAITING", what="waiting")
    client.control.revoke(result.id)
    wait_for(lambda: result.state == "REVOKED", what="revoked")
    node = live_nodes(system.web, {"later": "ready"}).wait_ready()
    # Had the revoked job still waited, the older one, it would go first, to the node's one slot.
    newer = submit(client, required_models=["later"])
    node.succeed(node.take_job(), "the newer job")
    assert newer.get(timeout=10) == "the newer job"
    assert [job["job_id"] for job in node.assigned()] == [newer.id], "the revoked job is never given to a node"
    assert result.state == "REVOKED" and r.hget(Keys().job(result.id), "state") == "cancelled"


def test_revoking_a_finished_job_changes_nothing(system: Any, client: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = submit(client)
    node.succeed(node.take_job(), "done")
    assert result.get(timeout=10) == "done"
    # AsyncResult.revoke's broadcast, waiting for the worker's answer: its revoke handler has run.
    answers = client.control.revoke(result.id, terminate=True, reply=True, limit=1, timeout=10)
    assert answers, "the worker answered the revoke"
    assert result.state == "SUCCESS"
    assert result.get(timeout=1) == "done"


def test_a_submission_revoked_before_any_worker_had_it_is_never_recorded(system: Any, client: Any,
                                                                          r: redis.Redis) -> None:
    """Celery marks REVOKED a task no worker holds; a worker that never heard of the revoke
    (started later, say) must not bring the job to life."""
    job_id = f"job-{uuid.uuid4()}"
    r.set(Keys().celery_result(job_id), json.dumps({"status": "REVOKED", "result": None, "task_id": job_id}))
    result = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr"}, task_id=job_id)
    wait_for(lambda: log_events(system.worker, "job_refused", job_id=job_id), what="the worker refusing it")
    assert not r.exists(Keys().job(job_id))
    assert result.state == "REVOKED"


def test_a_waiting_job_says_why_through_its_task_state(system: Any, client: Any, live_nodes: Any,
                                                       nodes: Any) -> None:
    live_nodes(system.web, {"other": "ready"}).wait_ready()
    registering = nodes(system.web).register()["node_id"]  # never heartbeats
    result = submit(client, required_models=["whisper"])
    wait_for(lambda: result.state == "WAITING", what="WAITING")
    info = result.info
    assert (info["eligible"], info["total"]) == (0, 2)
    assert info["exclusions"] == {"StatusNotReady": 1, "ModelNotAvailable": 1}
    assert set(info["examples"]) == {"StatusNotReady", "ModelNotAvailable"}
    assert info["examples"]["StatusNotReady"] == [registering]
    assert info["deadline_ms"] - info["waiting_since_ms"] == 300_000
    client.control.revoke(result.id)


def test_fail_fast_fails_at_once_when_no_node_could_ever_take_the_job(system: Any, client: Any,
                                                                       live_nodes: Any) -> None:
    live_nodes(system.web, {"other": "ready"}).wait_ready()
    started_s = time.monotonic()
    result = submit(client, required_models=["whisper"], fail_fast=True)
    with pytest.raises(Exception, match="no registered node could ever take it") as raised:
        result.get(timeout=10)
    assert type(raised.value).__name__ == "NoEligibleNode"
    assert time.monotonic() - started_s < 5, "not after the 300 s dispatch timeout"
    # A node that has the model, still loading it, could take it: the job waits.
    live_nodes(system.web, {"whisper": "loading"})
    waiting = submit(client, required_models=["whisper"], fail_fast=True)
    wait_for(lambda: waiting.state == "WAITING", what="waiting for the loading node")
    assert waiting.info["exclusions"] == {"StatusNotReady": 1, "ModelNotAvailable": 1} or \
        waiting.info["exclusions"] == {"ModelNotAvailable": 2}
    client.control.revoke(waiting.id)


def test_flowers_revoke_cancels_the_job(system: Any, client: Any, live_nodes: Any, flower: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = submit(client)
    node.take_job()
    answer = flower.call(f"/api/task/revoke/{result.id}?terminate=true", "POST")
    assert answer and "revoke" in answer.get("message", "").lower(), answer
    assert "revoked through Celery" in node.expect("job_cancel")["reason"]
    assert result.state == "REVOKED"
    # The job's events come from two processes, each sending in batches: the revoke may reach
    # Flower before the received event that names the task, whose name Flower then adds.
    wait_for(lambda: flower.task_in_state(result.id, "REVOKED")["name"] == "dispatcher.submit_job",
             what="flower shows the revoked job by its name")


def test_flower_shows_waiting_then_started_and_lists_no_internal_task(system: Any, client: Any, live_nodes: Any,
                                                                      flower: Any, r: redis.Redis) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    busy = submit(client)
    node.take_job()
    waiting = submit(client)  # waits for the slot: its completion runs a pass over the waiting jobs
    shown = flower.task_in_state(waiting.id, "WAITING")
    assert json.loads(shown["result"])["exclusions"] == {"CapacityExceeded": 1}
    node.succeed({"job_id": busy.id, "attempt": 1}, 1)
    second = node.take_job()
    flower.task_in_state(waiting.id, "STARTED")
    node.succeed(second, 2)
    assert waiting.get(timeout=10) == 2
    client.send_task("dispatcher.cancel_job", kwargs={"job_id": waiting.id}).get(timeout=10)
    # Two periodic scans while Flower watches, then a task sent after them: once Flower shows
    # that one, it has had the events sent before it (one worker sends them, in order).
    wait_for_scans(r, Keys(), int(time.time() * 1000), count=2)
    marker = client.send_task("dispatcher.cancel_job", kwargs={"job_id": waiting.id})
    flower.task_in_state(marker.id, "SUCCESS")
    names = {task["name"] for task in (flower.call("/api/tasks") or {}).values()}
    assert names <= {"dispatcher.submit_job", "dispatcher.cancel_job", "dispatcher.drain_node",
                     "dispatcher.undrain_node", "dispatcher.cordon_node", "dispatcher.uncordon_node"}, names
    assert {"dispatcher.submit_job", "dispatcher.cancel_job"} <= names


def test_celerys_command_line_revokes_and_shows_where_a_job_failed(system: Any, client: Any,
                                                                    live_nodes: Any) -> None:
    import subprocess

    def celery(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "celery", "-A", "dispatcher.celery_app", *args], capture_output=True,
                              text=True, timeout=60, env=clean_env(system.redis_url, **system.settings))

    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    running = submit(client)
    node.take_job()
    done = celery("control", "revoke", running.id)
    assert done.returncode == 0, done.stderr
    assert "revoked through Celery" in node.expect("job_cancel")["reason"]
    assert running.state == "REVOKED"
    failing = submit(client, max_attempts=1)
    node.fail(node.take_job(), "CUDA_ERROR", "device lost", retryable=False)
    with pytest.raises(Exception, match="CUDA_ERROR: device lost"):
        failing.get(timeout=10)
    shown = celery("result", "--traceback", failing.id)
    assert shown.returncode == 0, shown.stderr
    assert f"node {node.node_id}, attempt 1 of 1" in shown.stdout and "CUDA_ERROR: device lost" in shown.stdout
