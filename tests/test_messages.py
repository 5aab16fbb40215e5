"""The wire models: what a node may send, and what the server sends back."""

from __future__ import annotations

import json

import pytest

from dispatcher.messages import (
    DecodeError,
    JobAssign,
    JobResult,
    NodeHeartbeat,
    NodeRegister,
    NodeRegisterAck,
    NodeStatusMessage,
    decode_node_message,
    decode_server_message,
)


def test_register_needs_only_its_type_and_has_the_contracts_defaults() -> None:
    msg = decode_node_message('{"type": "node_register"}')
    assert isinstance(msg, NodeRegister)
    assert (msg.node_id, msg.accept_public_jobs, msg.max_concurrent_jobs) == (None, False, 1)
    assert msg.hardware.gpus == [] and msg.installed_models == [] and msg.labels == {} and msg.advanced_features == {}


def test_the_contracts_example_frames_validate() -> None:
    register = {"type": "node_register", "node_id": None, "node_secret": None, "registration_token": "t",
                "version": "agent version string", "capability_schema_version": "1.0",
                "advanced_features": {"batched_inference": True},
                "hardware": {"cpu_cores": 16, "memory_gb": 64.0, "gpus": [{"name": "NVIDIA H100", "memory_gb": 80.0}]},
                "installed_models": [{"model_id": "whisper-large-v3", "status": "ready"}],
                "accept_public_jobs": True, "max_concurrent_jobs": 4, "labels": {"region": "eu-west"}}
    heartbeat = {"type": "node_heartbeat", "node_id": "n-1", "timestamp": 1763900000000,
                 "resource_usage": {"cpu_percent": 12.5, "gpu_percent": 3.0, "mem_percent": 40.1, "running_jobs": 1},
                 "installed_models": [{"model_id": "whisper-large-v3", "status": "ready"}], "gpu_available": True}
    ok = {"type": "job_result", "job_id": "j", "attempt": 1, "success": True, "output": {"any": "json"},
          "duration_ms": 1234}
    failed = {"type": "job_result", "job_id": "j", "attempt": 1, "success": False,
              "error": {"code": "MODEL_CRASHED", "message": "...", "retryable": True}}
    for frame in (register, heartbeat, ok, failed, {"type": "job_ack", "job_id": "j", "attempt": 1},
                  {"type": "job_progress", "job_id": "j", "attempt": 1, "progress": 0.42, "message": "decoding"},
                  {"type": "node_drain", "reason": "shutting down"}):
        assert decode_node_message(json.dumps(frame)).type == frame["type"]
    assert isinstance(decode_node_message(json.dumps(ok)), JobResult)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    msg = decode_node_message('{"type": "node_heartbeat", "future_field": {"x": 1}}')
    assert isinstance(msg, NodeHeartbeat)


@pytest.mark.parametrize(("frame", "field"), [
    ('{"type": "node_register", "max_concurrent_jobs": "4"}', "max_concurrent_jobs"),
    ('{"type": "node_register", "accept_public_jobs": 1}', "accept_public_jobs"),
    ('{"type": "node_register", "labels": {"bad key": "x"}}', "labels"),
    ('{"type": "node_register", "installed_models": [{"model_id": "a", "status": "ready"},'
     ' {"model_id": "a", "status": "loading"}]}', "installed_models"),
    ('{"type": "job_progress", "job_id": "j", "attempt": 1, "progress": 1.5}', "progress"),
])
def test_wrong_types_are_refused_naming_the_field(frame: str, field: str) -> None:
    with pytest.raises(DecodeError, match=field) as raised:
        decode_node_message(frame)
    assert raised.value.ref_type == json.loads(frame)["type"]


def test_server_frames_round_trip_for_agents() -> None:
    frame = NodeStatusMessage(node_id="n-1", status="degraded", previous_status="ready",
                              reason="3 consecutive failed health checks", timestamp=1763900000000).encode()
    assert json.loads(frame)["previous_status"] == "ready"
    assert decode_server_message(frame) == NodeStatusMessage.model_validate_json(frame)


def test_server_frames_send_integral_numbers_as_integers_but_payloads_as_given() -> None:
    ack = NodeRegisterAck(node_id="n-1", node_secret="s", status="registering",
                          heartbeat_interval_seconds=15.0, heartbeat_timeout_seconds=0.5).encode()
    assert ack.endswith('"heartbeat_interval_seconds":15,"heartbeat_timeout_seconds":0.5}')
    assign = JobAssign(job_id="j", attempt=1, job_type="asr", payload={"gain": 2.0}, timeout_seconds=300.0).encode()
    assert '"payload":{"gain":2.0}' in assign and assign.endswith('"timeout_seconds":300}')


def test_a_status_without_periodic_is_a_transition() -> None:
    frame = '{"type": "node_status", "node_id": "n-1", "status": "ready", "timestamp": 1}'
    assert decode_server_message(frame).periodic is False
