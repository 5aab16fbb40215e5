"""The wire models: what a node may send, and what the server sends back."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from dispatcher.messages import (
    MAX_JSON_DEPTH,
    DecodeError,
    JobAssign,
    JobResult,
    NodeHeartbeat,
    NodeRegister,
    NodeRegisterAck,
    NodeStatusMessage,
    check_json_value,
    decode_node_message,
    decode_server_message,
    integral_numbers,
    valid_job_id,
    valid_node_id,
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


def test_json_values_a_node_could_not_read_are_refused() -> None:
    deep: Any = []
    for _ in range(MAX_JSON_DEPTH - 1):
        deep = [deep]
    assert check_json_value(deep) is deep, "as deep as allowed"
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        check_json_value([deep])
    for number in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="is not a JSON number"):
            check_json_value({"scores": [1.0, {"x": number}]})


def test_integral_floats_become_integers_everywhere_but_others_stay() -> None:
    assert integral_numbers({"a": 15.0, "b": [2.0, 2.5, {"c": 0.0}], "d": "3.0", "e": True}) == \
        {"a": 15, "b": [2, 2.5, {"c": 0}], "d": "3.0", "e": True}
    assert type(integral_numbers(1e3)) is int


@pytest.mark.parametrize(("value", "node_ok", "job_ok"), [
    ("gpu-box_07.eu", True, True), ("x" * 64, True, True), ("x" * 65, False, True), ("x" * 129, False, False),
    ("", False, False), ("a:b", False, False), ("a b", False, False), ("é", False, False), ("n-1\n", False, False),
])
def test_ids_that_could_name_another_key_are_not_valid(value: str, node_ok: bool, job_ok: bool) -> None:
    assert (valid_node_id(value), valid_job_id(value)) == (node_ok, job_ok)


def test_a_refusal_names_each_field_and_never_echoes_much_of_a_key() -> None:
    with pytest.raises(DecodeError) as raised:
        decode_node_message(json.dumps({"type": "node_register", "labels": {"k" * 500: "v"}, "max_concurrent_jobs": 0}))
    assert str(raised.value) == (
        "max_concurrent_jobs: Input should be greater than or equal to 1; "
        f"labels.{'k' * 64}.[key]: String should match pattern '^[A-Za-z0-9][A-Za-z0-9._/-]{{0,62}}$'"), \
        "each field named, and at most 64 characters of a key the peer chose"
