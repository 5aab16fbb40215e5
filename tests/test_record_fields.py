"""The codecs name every field the scripts write, and no other: a node and its jobs are
taken through a life on real Redis (registered, heartbeating out of step with its jobs,
jobs acknowledged with progress, retried, succeeded, failed by the node until it is
degraded, counted, cordoned, drained, disconnected), then every field of every hash is
looked for in ``FIELDS``, and every name in ``FIELDS`` among the fields written."""

from __future__ import annotations

import json
from typing import Any

import redis

from dispatcher.jobs import Jobs
from dispatcher.keys import Keys
from dispatcher.messages import NodeHeartbeat, NodeRegister, decode_node_message
from dispatcher.records import JobRecord, NodeRecord
from dispatcher.registry import Registry
from dispatcher.vocabulary import JobState, NodeStatus
from tests.conftest import client_app
from tests.support import apply_result

PREFIX = "{recordfields}"
T0 = 1_800_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        self.now += 10
        return self.now


def test_every_field_written_is_named_and_parsed(make_settings: Any, r: redis.Redis, db_url: str) -> None:
    clock = Clock()
    settings = make_settings(key_prefix=PREFIX, job_failures_consecutive=2, running_jobs_mismatch_heartbeats=2)
    registry, jobs, keys = Registry(r, settings, clock=clock), Jobs(r, settings, client_app(db_url), clock=clock), \
        Keys(PREFIX)
    reg = registry.register(NodeRegister.model_validate_json(json.dumps({
        "type": "node_register", "accept_public_jobs": True, "max_concurrent_jobs": 2, "labels": {"zone": "eu"},
        "installed_models": [{"model_id": "a", "status": "ready"}], "advanced_features": {"streaming": True},
        "hardware": {"cpu_cores": 8, "memory_gb": 32, "gpus": [{"name": "L4", "memory_gb": 24}]}})), "s-1", "w-1")
    node_id = reg.node.node_id

    def beat(running_jobs: int = 0) -> None:
        registry.heartbeat(reg.node, NodeHeartbeat.model_validate_json(json.dumps({
            "type": "node_heartbeat", "gpu_available": True,
            "resource_usage": {"cpu_percent": 5, "gpu_percent": 7.5, "mem_percent": 9, "running_jobs": running_jobs}})))

    def result(job_id: str, attempt: int, **fields: Any) -> str:
        frame = {"type": "job_result", "job_id": job_id, "attempt": attempt, **fields}
        return apply_result(jobs, node_id, decode_node_message(json.dumps(frame)))

    def frame(**fields: Any) -> Any:
        return decode_node_message(json.dumps(fields))

    for _ in range(3):
        beat()
    beat(running_jobs=1)
    beat(running_jobs=1)  # out of step for 2 heartbeats: an episode of running_jobs mismatch

    # a job retried after a retryable error, then done; its progress on the way
    jobs.submit("j-1", {"job_type": "t", "required_models": ["a"], "max_attempts": 2, "node_selector": {"zone": "eu"}})
    jobs.ack(node_id, frame(type="job_progress", job_id="j-1", attempt=1, progress=0.5, message="half"))
    assert result("j-1", 1, success=False, error={"code": "E", "message": "m", "retryable": True}) == "retry"
    jobs.dispatch_waiting()
    jobs.ack(node_id, frame(type="job_ack", job_id="j-1", attempt=2))
    assert result("j-1", 2, success=True, output={"y": []}) == "succeeded"
    # two failures of the node's own: degraded for JobFailures, cooling down
    for job_id in ("j-2", "j-3"):
        jobs.submit(job_id, {"job_type": "t", "max_attempts": 1})
        result(job_id, 1, success=False, error={"code": "CUDA", "message": "m", "retryable": False,
                                                "node_fault": True})
    jobs.submit("j-4", {"job_type": "t", "dispatch_timeout_seconds": 60})  # waits: the node is degraded
    jobs.scripts.count_node_jobs({node_id: {f"finished_{state}": 1 for state in ("succeeded", "failed", "cancelled")}})
    registry.cordon(node_id, "bob", "disk")
    registry.drain(node_id, "alice", "maintenance", deadline_s=60)
    registry.undrain(node_id, "alice")  # (drained at once: it had no job)
    registry.close_session(node_id, "s-1")

    node_fields = set(r.hkeys(keys.node(node_id)))
    job_fields = set().union(*(r.hkeys(keys.job(j)) for j in ("j-1", "j-2", "j-3", "j-4")))
    assert node_fields - set(NodeRecord.FIELDS) == set(), "fields a script writes that the codec does not name"
    assert set(NodeRecord.FIELDS) - node_fields == set(), "names of fields no script wrote"
    assert job_fields - set(JobRecord.FIELDS) == set()
    assert set(JobRecord.FIELDS) - job_fields == set()

    node = NodeRecord.from_hash(r.hgetall(keys.node(node_id)))
    assert node.status is NodeStatus.OFFLINE and node.previous_status is not None and not node.connected
    assert (node.gpu_count, node.gpu_available, node.max_concurrent_jobs, node.labels) == (1, True, 2, {"zone": "eu"})
    assert node.job_last_failure is not None and node.job_last_failure["code"] == "CUDA"
    assert node.job_cooldown_until_ms is not None and node.cordoned and node.cordoned_by == "bob"
    assert node.drain_requested and node.drain_outcome == "undrained" and node.drain_deadline_ms is not None
    assert node.finished == dict.fromkeys((JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED), 1)
    done = JobRecord.from_hash(r.hgetall(keys.job("j-1")))
    assert done.state is JobState.SUCCEEDED and done.output == '{"y":[]}' and done.attempt == 2
    assert [a["attempt"] for a in done.attempts] == [1, 2] and done.avoid == [node_id]
    assert done.last_error is not None and (done.last_error["code"], done.last_error["retryable"]) == ("E", True)
    assert done.outcome is not None and done.outcome["state"] == "succeeded"
    waiting = JobRecord.from_hash(r.hgetall(keys.job("j-4")))
    assert waiting.state is JobState.WAITING and waiting.node_id is None and waiting.last_decision is not None
