"""Jobs end to end: submitted through the Celery API by a client that has only
celery, dispatched by Lua to a node's queue, delivered over WebSocket, and the
node's output back from AsyncResult.get()."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis
from celery.exceptions import TaskRevokedError

from dispatcher.keys import Keys
from tests.support import LiveNode, integral_floats, job_attempts, wait_for, wait_for_scans, wait_until_acknowledged


def submit(client: Any, **fields: Any) -> Any:
    spec = {"job_type": "asr", "payload": {"audio_url": "s3://a.wav"}, **fields}
    return client.send_task("dispatcher.submit_job", kwargs=spec, task_id=f"job-{uuid.uuid4()}")


def test_round_trip_returns_the_nodes_output_exactly(system: Any, client: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"whisper": "ready"}, max_concurrent_jobs=2).wait_ready()
    result = submit(client, required_models=["whisper"], payload={"audio": [1, 2.5, []], "empty": {}})
    assert result.state == "PENDING"
    job = node.take_job()
    assert (job["job_id"], job["attempt"], job["job_type"]) == (result.id, 1, "asr")
    assert job["payload"] == {"audio": [1, 2.5, []], "empty": {}}, "the payload arrives exactly as submitted"
    assert (job["required_models"], job["require_gpu"], job["timeout_seconds"]) == (["whisper"], False, 300)
    wait_for(lambda: result.state == "STARTED", what="STARTED after the ack")
    assert result.info == {"node_id": node.node_id, "attempt": 1}
    node.send({"type": "job_progress", "job_id": job["job_id"], "attempt": 1, "progress": 0.5, "message": "half"})
    wait_for(lambda: (result.info or {}).get("progress") == 0.5, what="progress in info")
    output = {"text": "hello", "segments": [], "scores": [0.1, 1e-9, 12345678901234567890], "none": None}
    node.succeed(job, output)
    assert result.get(timeout=10) == output
    assert result.state == "SUCCESS"


def test_a_client_asking_for_the_tasks_own_result_still_gets_the_nodes(system: Any, client: Any,
                                                                     live_nodes: Any, r: redis.Redis) -> None:
    """``ignore_result=False`` in the message must not let Celery store the submit
    task's None as SUCCESS before the node has answered."""
    node = live_nodes(system.web, {"whisper": "ready"}).wait_ready()
    result = client.send_task("dispatcher.submit_job", task_id=f"job-{uuid.uuid4()}", ignore_result=False,
                              kwargs={"job_type": "asr", "payload": {}, "required_models": ["whisper"]})
    job = node.take_job()
    wait_until_acknowledged(r, result.id)  # acknowledged once the worker's task returned
    assert result.state in ("PENDING", "STARTED")
    node.succeed(job, {"text": "mine"})
    assert result.get(timeout=10) == {"text": "mine"}


@pytest.mark.parametrize(("fields", "named"), [
    ({"payload": {}}, "job_type"),
    ({"job_type": "asr", "priority": 12}, "priority"),
    ({"job_type": "asr", "max_attempts": 0}, "max_attempts"),
    ({"job_type": "asr", "require_gpu": "yes"}, "require_gpu"),
    ({"job_type": "asr", "timeout_seconds": -1}, "timeout_seconds"),
    ({"job_type": "asr", "node_selector": {"bad key": "x"}}, "node_selector"),
    ({"job_type": "asr", "colour": "blue"}, "colour"),
])
def test_invalid_fields_fail_the_task_naming_the_field(system: Any, client: Any, r: redis.Redis,
                                                      fields: dict[str, Any], named: str) -> None:
    result = client.send_task("dispatcher.submit_job", kwargs=fields)
    with pytest.raises(Exception, match=named) as raised:
        result.get(timeout=10)
    assert type(raised.value).__name__ == "InvalidJob" and result.state == "FAILURE"
    assert not r.exists(Keys().job(result.id)), "an invalid job leaves nothing behind"


def test_the_job_goes_to_a_node_with_the_selector_labels(system: Any, client: Any, live_nodes: Any) -> None:
    plain = live_nodes(system.web, {"m": "ready"}).wait_ready()
    labelled = live_nodes(system.web, {"m": "ready"}, labels={"region": "eu", "tier": "a100"}).wait_ready()
    results = [submit(client, node_selector={"region": "eu"}) for _ in range(3)]
    for _ in results:
        labelled.succeed(labelled.take_job(), "ok")
    assert [x.get(timeout=10) for x in results] == ["ok"] * 3
    assert plain.assigned() == []


def test_a_waiting_job_is_dispatched_the_moment_a_slot_frees(system: Any, client: Any, live_nodes: Any) -> None:
    """The scan runs every 0.5 s here too, but a kick is what places it: well under one scan."""
    node = live_nodes(system.web, {"m": "ready"}, max_concurrent_jobs=1).wait_ready()
    first = submit(client)
    job = node.take_job()
    second = submit(client)
    meta = wait_for(lambda: second.state == "WAITING" and second.info, what="the second job's decision")
    assert meta["exclusions"] == {"CapacityExceeded": 1}, "capacity is the server's own count: the second job waits"
    freed_at = time.monotonic()
    node.succeed(job, 1)
    node.succeed(node.take_job(), 2)
    assert time.monotonic() - freed_at < 3
    assert (first.get(timeout=10), second.get(timeout=10)) == (1, 2)


def test_higher_priority_goes_first_among_waiting_jobs(system: Any, client: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}, max_concurrent_jobs=1).wait_ready()
    blocker = submit(client)
    held = node.take_job()
    low = submit(client, priority=1)
    mid = submit(client, priority=5)
    high = submit(client, priority=9)
    wait_for(lambda: all(x.state == "WAITING" for x in (low, mid, high)), what="all three waiting")
    node.succeed(held, "b")
    order = []
    for _ in range(3):
        job = node.take_job()
        order.append(job["job_id"])
        node.succeed(job, job["job_id"])
    assert order == [high.id, mid.id, low.id]
    assert blocker.get(timeout=10) == "b" and low.get(timeout=10) == low.id


def test_retryable_error_retries_on_another_node_then_fails_with_the_nodes_error(
        system: Any, client: Any, live_nodes: Any) -> None:
    a = live_nodes(system.web, {"m": "ready"}).wait_ready()
    b = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = submit(client, max_attempts=2)
    first_node = a if wait_for(lambda: a.assigned() or b.assigned(), what="assigned") == a.assigned() else b
    other = b if first_node is a else a
    job = first_node.take_job()
    first_node.fail(job, "MODEL_CRASHED", "CUDA error: out of memory", retryable=True)
    retry = other.take_job(attempt=2)
    assert retry["job_id"] == result.id, "the retry prefers another node"
    other.fail(retry, "MODEL_CRASHED", "CUDA error again", retryable=True)
    with pytest.raises(Exception) as raised:
        result.get(timeout=10)
    assert type(raised.value).__name__ == "JobFailed"
    assert str(raised.value).startswith("MODEL_CRASHED: CUDA error again") and "attempt 2 of 2" in str(raised.value)


def test_a_non_retryable_error_fails_at_once(system: Any, client: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = submit(client, max_attempts=3)
    node.fail(node.take_job(), "BAD_AUDIO", "not a WAV file", retryable=False)
    with pytest.raises(Exception, match="BAD_AUDIO: not a WAV file"):
        result.get(timeout=10)


def test_a_stale_result_is_ignored_and_a_duplicate_accepted_once(system: Any, client: Any, live_nodes: Any,
                                                                  r: redis.Redis) -> None:
    a = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = submit(client, max_attempts=3)
    first = a.take_job()
    a.fail(first, "FLAKY", "try again", retryable=True)
    second = a.take_job(attempt=2)  # the only node: it gets the retry
    a.succeed(first, "from the old attempt")  # stale: ignored, no error
    a.succeed(second, "right")
    a.succeed(second, "right again")  # a duplicate of the current attempt: accepted once
    assert result.get(timeout=10) == "right"
    a.sync()  # every answer to the results sent has arrived
    assert a.errors() == []
    attempts = [x["outcome"] for x in _attempts(r, result.id)]
    assert attempts == ["failed: FLAKY", "succeeded"]


def _attempts(r: redis.Redis, job_id: str) -> list[dict[str, Any]]:

    return job_attempts(r, job_id)


def test_cancel_a_waiting_job(system: Any, client: Any, r: redis.Redis) -> None:
    result = submit(client, required_models=["nobody-has-this"])
    wait_for(lambda: r.zscore(Keys().waiting(), result.id) is not None, what="waiting")
    assert client.send_task("dispatcher.cancel_job", kwargs={"job_id": result.id}).get(timeout=10) == "cancelled"
    with pytest.raises(TaskRevokedError, match="cancelled"):
        result.get(timeout=10)
    assert result.state == "REVOKED"


def test_cancel_a_running_job_tells_the_node(system: Any, client: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = submit(client)
    job = node.take_job()
    reply = client.send_task("dispatcher.cancel_job", kwargs={"job_id": result.id, "reason": "user gave up"})
    assert reply.get(timeout=10) == "cancelled"
    cancel = node.expect("job_cancel")
    assert (cancel["job_id"], cancel["attempt"], cancel["reason"]) == (job["job_id"], 1, "user gave up")
    with pytest.raises(TaskRevokedError, match="user gave up"):
        result.get(timeout=10)
    node.succeed(job, "too late")  # ignored
    second = submit(client)
    node.succeed(node.take_job(), "slot was freed")
    assert second.get(timeout=10) == "slot was freed"


def test_job_frames_send_integral_numbers_as_integers(system: Any, client: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = submit(client, timeout_seconds=300)  # 300.0 once validated
    node.take_job()
    client.send_task("dispatcher.cancel_job", kwargs={"job_id": result.id}).get(timeout=10)
    node.expect("job_cancel")
    assert [(text, found) for text in node.client.raw if (found := integral_floats(text))] == []


def test_a_node_away_when_its_job_was_cancelled_is_told_when_it_resumes(system: Any, client: Any,
                                                                         live_nodes: Any, r: redis.Redis) -> None:
    node = live_nodes(system.web, {"m": "ready"}, max_concurrent_jobs=2).wait_ready()
    cancelled, kept = submit(client), submit(client)
    first, second = node.take_job(), node.take_job()
    assert {first["job_id"], second["job_id"]} == {cancelled.id, kept.id}
    node.close()
    wait_for(lambda: r.hget(Keys().node(node.node_id), "status") == "offline", what="offline")
    reply = client.send_task("dispatcher.cancel_job", kwargs={"job_id": cancelled.id, "reason": "user gave up"})
    assert reply.get(timeout=10) == "cancelled"
    back = LiveNode(system.web.ws_url, {"m": "ready"}, node_id=node.node_id, node_secret=node.secret)
    try:
        cancel = back.expect("job_cancel")
        assert (cancel["job_id"], cancel["attempt"], cancel["reason"]) == (cancelled.id, 1, "user gave up")
        again = back.expect("job_assign")
        assert again["job_id"] == kept.id, "only the job still assigned is sent again"
        back.wait_ready()
        assert [f["job_id"] for f in back.all_frames if f.get("type") == "job_assign"] == [kept.id]
        back.succeed(again, "kept")
        assert kept.get(timeout=10) == "kept"
    finally:
        back.close()


def test_cancelling_a_finished_job_says_so(system: Any, client: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = submit(client)
    node.succeed(node.take_job(), "done")
    assert result.get(timeout=10) == "done"
    assert client.send_task("dispatcher.cancel_job", kwargs={"job_id": result.id}).get(timeout=10) == "succeeded"
    assert result.state == "SUCCESS"


def test_a_job_over_its_timeout_is_cancelled_on_the_node_and_fails(system: Any, client: Any,
                                                                     live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = submit(client, timeout_seconds=1, max_attempts=1)
    node.take_job()
    cancel = node.expect("job_cancel", timeout_s=10)
    assert "did not finish attempt 1 within 1 s" in cancel["reason"]
    with pytest.raises(Exception, match="did not finish attempt 1 within 1 s") as raised:
        result.get(timeout=10)
    assert type(raised.value).__name__ == "JobTimedOut"


def test_no_eligible_node_fails_after_the_dispatch_timeout_with_counts(system: Any, client: Any,
                                                                        live_nodes: Any, nodes: Any) -> None:
    live_nodes(system.web, {"other": "ready"}).wait_ready()
    nodes(system.web).register()  # registering: never heartbeats
    result = submit(client, required_models=["whisper"], dispatch_timeout_seconds=1)
    with pytest.raises(Exception) as raised:
        result.get(timeout=15)
    message = str(raised.value)
    assert type(raised.value).__name__ == "NoEligibleNode"
    assert message.startswith("0/2 nodes eligible: 1 StatusNotReady, 1 ModelNotAvailable (e.g. StatusNotReady: n-")


def test_every_exclusion_reason_in_the_failure_message(system: Any, client: Any, live_nodes: Any, nodes: Any) -> None:
    gpu = {"hardware": {"gpus": [{"name": "L4", "memory_gb": 24}]}}
    everything = {"accept_public_jobs": True, "labels": {"pool": "x"}, **gpu}
    nodes(system.web).register(**everything)  # StatusNotReady: never heartbeats
    live_nodes(system.web, {"m": "ready"}, labels={"pool": "x"}, **gpu).wait_ready()  # NotInPublicPool
    live_nodes(system.web, {"m": "ready"}, accept_public_jobs=True, **gpu).wait_ready()  # NodeSelectorMismatch
    live_nodes(system.web, {"m": "ready"}, accept_public_jobs=True, labels={"pool": "x"}).wait_ready()  # no GPU
    live_nodes(system.web, {"other": "ready"}, **everything).wait_ready()  # ModelNotAvailable
    busy = live_nodes(system.web, {"m": "ready"}, max_concurrent_jobs=1, **everything).wait_ready()
    hot = live_nodes(system.web, {"m": "ready"}, **everything)
    hot.usage["cpu_percent"] = 95.0  # threshold is 90 here
    hot.wait_ready()
    filler = submit(client, node_selector={"pool": "x"}, required_models=["m"], require_gpu=True, public=True)
    held = busy.take_job(job_id=filler.id) if not hot.assigned() else None
    assert held is not None, "only the busy node could take the filler"
    result = submit(client, public=True, node_selector={"pool": "x"}, require_gpu=True, required_models=["m"],
                    dispatch_timeout_seconds=1)
    with pytest.raises(Exception) as raised:
        result.get(timeout=15)
    message = str(raised.value)
    assert message.startswith(
        "0/7 nodes eligible: 1 StatusNotReady, 1 NotInPublicPool, 1 NodeSelectorMismatch, 1 GpuUnavailable, "
        "1 ModelNotAvailable, 1 CapacityExceeded, 1 ResourceThresholdExceeded (e.g. StatusNotReady: n-"), message
    assert f"CapacityExceeded: {busy.node_id}" in message and f"ResourceThresholdExceeded: {hot.node_id}" in message


def test_a_lost_nodes_job_goes_to_another_node_after_the_grace(system: Any, client: Any, live_nodes: Any,
                                                               r: redis.Redis) -> None:
    doomed = live_nodes(system.web, {"m": "ready"}, labels={"who": "doomed"}).wait_ready()
    result = submit(client, node_selector={"who": "doomed"})
    doomed.take_job()
    doomed.close()  # the session ends: offline now, its job waits the grace (3 s here)
    wait_for(lambda: r.hget(Keys().node(doomed.node_id), "status") == "offline", what="offline")
    heir = live_nodes(system.web, {"m": "ready"}, labels={"who": "doomed"}).wait_ready()
    job = heir.take_job(timeout_s=15, attempt=2)
    assert job["job_id"] == result.id
    heir.succeed(job, "saved")
    assert result.get(timeout=10) == "saved"
    outcomes = [a["outcome"] for a in _attempts(r, result.id)]
    assert outcomes == ["NODE_LOST", "succeeded"]


def test_a_node_that_resumes_within_the_grace_keeps_its_job(system: Any, client: Any, live_nodes: Any,
                                                           r: redis.Redis) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = submit(client)
    job = node.take_job()
    node.close()
    wait_for(lambda: r.hget(Keys().node(node.node_id), "status") == "offline", what="offline")
    grace_ends_ms = int(r.zscore(Keys().lost(), node.node_id))  # its job is taken back then, unless it is back
    back = LiveNode(system.web.ws_url, {"m": "ready"}, node_id=node.node_id, node_secret=node.secret)
    try:
        again = back.expect("job_assign")
        assert (again["job_id"], again["attempt"]) == (job["job_id"], 1), "the same attempt, sent again"
        back.wait_ready()
        # Past the grace: two scans after it ended (the second begins once the first is done).
        wait_for_scans(r, Keys(), grace_ends_ms, count=2)
        assert r.hget(Keys().job(result.id), "node_id") == node.node_id, "still its job"
        back.succeed(again, "kept")
        assert result.get(timeout=10) == "kept"
        assert [a["outcome"] for a in _attempts(r, result.id)] == ["succeeded"]
    finally:
        back.close()
