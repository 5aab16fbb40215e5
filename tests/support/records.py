"""Stored records for the codec and view tests: a node and a job as the scripts write them,
and the texts an older version, an operator's HSET or a bug may leave in a field."""

from __future__ import annotations

import json

from hypothesis import strategies as st

NOW = 1_800_000_000_000

#: What an older version, an operator's HSET or a bug may leave in a field.
HOSTILE = ["1e+17", "nan", "NaN", "inf", "-inf", "Infinity", "-1", "", "abc", "{", "[", "null", "[1, 2]", '{"a": 1}',
           "9" * 400, "9" * 5000, "[" * 100_000, '{"a": ' * 50_000, "0.5", "-0.0", "1_000", " 7 ", "0x10", "sideways",
           "ready", "1", "0", "1:2", "abc:123", "3:", ":5", "\x00", "é"]

#: A node as the scripts write it: registered, heartbeating, drained once, cordoned, with a job failure.
NODE = {
    "node_id": "n-1", "secret_hash": "f" * 64, "session_id": "s-1", "web_id": "w-1", "connected": "1",
    "session_started_ms": "1799999990000", "registered_at_ms": "1799999000000",
    "version": "1.2.0", "capability_schema_version": "1",
    "advanced_features": '{"streaming": true}', "hardware": '{"cpu_cores": 8, "memory_gb": 32, "gpus": []}',
    "gpu_count": "2", "gpu_available": "1",
    "models": '[{"model_id":"a","status":"ready"},{"model_id":"b","status":"loading"}]',
    "labels": '{"zone": "eu"}', "accept_public": "1", "max_concurrent_jobs": "4",
    "status": "ready", "previous_status": "registering", "status_reason": "3 consecutive healthy heartbeats",
    "offline_cause": "NODE_LOST",
    "status_since_ms": "1799999991000",
    "last_seen_ms": "1799999999000", "last_heartbeat_ms": "1799999999000",
    "cpu_percent": "12.5", "gpu_percent": "", "mem_percent": "40", "running_jobs": "1",
    "last_healthy": "1", "last_health_reason": "ok", "window": "110", "consecutive_ok": "3", "consecutive_fail": "0",
    "running_mismatch": "4:1799999995000",
    "job_window": "1100", "job_last_failure": '{"code":"CUDA_OOM","job_id":"j-9","at_ms":1799999992000}',
    "job_cooldown_until_ms": "1800000060000",
    "drain_requested_ms": "1799999993000", "drain_requested_by": "alice", "drain_reason": "maintenance",
    "drain_deadline_ms": "", "drain_jobs_at_start": "2", "drain_ended_ms": "1799999994000",
    "drain_outcome": "cancelled", "drain_pending": "0",
    "cordoned": "1", "cordon_reason": "disk", "cordoned_by": "bob", "cordoned_ms": "1799999996000",
    "finished_succeeded": "7", "finished_failed": "2", "finished_cancelled": "1",
}

#: A job as the scripts write it: submitted, retried once, now running its second attempt.
JOB = {
    "job_id": "j-1", "job_type": "t", "payload": '{"x": [1, 2]}', "required_models": '["a"]', "require_gpu": "1",
    "public": "0", "node_selector": '{"zone": "eu"}', "timeout_seconds": "2.5", "timeout_ms": "2500",
    "max_attempts": "3", "dispatch_timeout_ms": "300000", "priority": "5", "needs_class": "abcdef0123456789",
    "needs": '{"node_selector":{"zone":"eu"},"public":false,"require_gpu":true,"required_models":["a"]}',
    "queue_score": "41799999000000", "submitted_ms": "1799999000000", "worker": "celery@host",
    "state": "running", "waiting_since_ms": "1799999100000", "avoid": '["n-2"]',
    "last_decision": '{"outcome":"assigned","node_id":"n-1","at_ms":1799999200000}',
    "attempt": "2", "node_id": "n-1", "assigned_ms": "1799999200000", "acked_ms": "1799999201000",
    "progress": "0.5", "progress_message": "half way",
    "attempts": '[{"attempt":1,"node_id":"n-2","outcome":"failed: CUDA_OOM"}]',
    "last_error": '{"code":"CUDA_OOM","message":"out of memory","retryable":true}',
    "result_received_ms": "1799999150000", "finished_ms": "", "outcome": "", "output": "",
}


#: Values of the examples' fields that read as the defaults, replaced by some that do not.
HUGE = "9" * 400

texts = st.one_of(st.sampled_from(HOSTILE), st.text(), st.from_regex(r"-?[0-9]{1,20}(\.[0-9]*)?(e[+-]?[0-9]+)?"),
                  st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                          max_size=3),
                               max_leaves=8).map(json.dumps))
