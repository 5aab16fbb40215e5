"""The codecs of the stored hashes (dispatcher/records.py), without Redis: every field the
scripts write is parsed, every bad text falls back as the views always did, and nothing
makes ``from_hash`` raise. (tests/test_record_views.py: the views built on them.)"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from dispatcher.filter import NODE_FIELDS, JobNeeds
from dispatcher.records import JobRecord, NodeRecord, as_float, as_int, as_json
from dispatcher.vocabulary import FINAL_STATES, JobState, NodeStatus
from tests.support.records import HOSTILE, HUGE, JOB, NODE, texts

NOT_DEFAULT = {"gpu_percent": "3", "consecutive_fail": "2", "drain_deadline_ms": "5", "drain_pending": "1",
               "public": "1", "finished_ms": "7", "outcome": '{"state":"failed"}', "output": "1"}


def test_the_fields_are_the_ones_the_scripts_write() -> None:
    assert set(NodeRecord.FIELDS) == set(NODE) and len(NodeRecord.FIELDS) == len(set(NodeRecord.FIELDS))
    assert set(JobRecord.FIELDS) == set(JOB) and len(JobRecord.FIELDS) == len(set(JobRecord.FIELDS))
    assert set(NODE_FIELDS) <= set(NodeRecord.FIELDS) and set(JobNeeds.FIELDS) <= set(JobRecord.FIELDS)


@pytest.mark.parametrize(("codec", "stored"), [(NodeRecord, NODE), (JobRecord, JOB)])
def test_every_field_is_read(codec: Any, stored: dict[str, str]) -> None:
    """Each field alone changes the record: none is left unread."""
    empty = codec.from_hash({})
    assert empty == codec(), "an empty hash is the defaults"
    for name, value in {**stored, **{k: v for k, v in NOT_DEFAULT.items() if k in stored}}.items():
        assert codec.from_hash({name: value}) != empty, name


def test_a_node_as_the_scripts_write_it() -> None:
    node = NodeRecord.from_hash(NODE)
    assert (node.node_id, node.secret_hash, node.session_id, node.web_id, node.connected) == (
        "n-1", "f" * 64, "s-1", "w-1", True)
    assert "secret_hash" not in repr(node), "the secret's hash stays out of logs"
    assert (node.session_started_ms, node.registered_at_ms) == (1799999990000, 1799999000000)
    assert (node.version, node.capability_schema_version, node.advanced_features) == ("1.2.0", "1", {"streaming": True})
    assert node.hardware == {"cpu_cores": 8, "memory_gb": 32, "gpus": []}
    assert (node.gpu_count, node.gpu_available, node.accept_public, node.max_concurrent_jobs) == (2, True, True, 4)
    assert node.models == [{"model_id": "a", "status": "ready"}, {"model_id": "b", "status": "loading"}]
    assert node.labels == {"zone": "eu"}
    assert node.status is NodeStatus.READY and node.status_text == "ready"
    assert node.previous_status is NodeStatus.REGISTERING and node.previous_status_text == "registering"
    assert (node.status_reason, node.status_since_ms) == ("3 consecutive healthy heartbeats", 1799999991000)
    assert (node.last_seen_ms, node.last_heartbeat_ms) == (1799999999000, 1799999999000)
    assert (node.cpu_percent, node.gpu_percent, node.mem_percent, node.running_jobs) == (12.5, None, 40.0, 1)
    assert (node.last_healthy, node.last_health_reason, node.window) == (True, "ok", "110")
    assert (node.consecutive_ok, node.consecutive_fail) == (3, 0)
    assert (node.mismatch_heartbeats, node.mismatch_since_ms) == (4, 1799999995000)
    assert node.job_window == "1100" and node.job_cooldown_until_ms == 1800000060000
    assert node.job_last_failure == {"code": "CUDA_OOM", "job_id": "j-9", "at_ms": 1799999992000}
    assert (node.drain_requested, node.drain_requested_ms, node.drain_requested_by, node.drain_reason) == (
        True, 1799999993000, "alice", "maintenance")
    assert (node.drain_deadline_ms, node.drain_jobs_at_start, node.drain_ended_ms) == (None, 2, 1799999994000)
    assert (node.drain_outcome, node.drain_pending) == ("cancelled", False)
    assert (node.cordoned, node.cordon_reason, node.cordoned_by, node.cordoned_ms) == (True, "disk", "bob",
                                                                                         1799999996000)
    assert node.finished == {JobState.SUCCEEDED: 7, JobState.FAILED: 2, JobState.CANCELLED: 1}


def test_a_job_as_the_scripts_write_it() -> None:
    job = JobRecord.from_hash(JOB)
    assert (job.job_id, job.job_type, job.payload) == ("j-1", "t", '{"x": [1, 2]}'), "the payload stays verbatim"
    assert (job.required_models, job.require_gpu, job.public, job.node_selector) == (["a"], True, False,
                                                                                     {"zone": "eu"})
    assert (job.timeout_seconds, job.timeout_ms, job.max_attempts, job.dispatch_timeout_ms) == (2.5, 2500, 3, 300000)
    assert (job.priority, job.needs_class, job.queue_score, job.submitted_ms) == (
        5, "abcdef0123456789", 41799999000000, 1799999000000)
    assert job.needs == {"node_selector": {"zone": "eu"}, "public": False, "require_gpu": True,
                         "required_models": ["a"]}
    assert job.worker == "celery@host"
    assert job.state is JobState.RUNNING and job.state_text == "running"
    assert (job.waiting_since_ms, job.avoid) == (1799999100000, ["n-2"])
    assert job.last_decision == {"outcome": "assigned", "node_id": "n-1", "at_ms": 1799999200000}
    assert (job.attempt, job.node_id, job.assigned_ms, job.acked_ms) == (2, "n-1", 1799999200000, 1799999201000)
    assert (job.progress, job.progress_message) == (0.5, "half way")
    assert job.attempts == [{"attempt": 1, "node_id": "n-2", "outcome": "failed: CUDA_OOM"}]
    assert job.last_error == {"code": "CUDA_OOM", "message": "out of memory", "retryable": True}
    assert (job.result_received_ms, job.finished_ms, job.outcome, job.output) == (1799999150000, None, None, "")


def test_a_finished_job() -> None:
    job = JobRecord.from_hash({**JOB, "state": "succeeded", "node_id": "n-1", "finished_ms": "1799999300000",
                               "outcome": '{"state":"succeeded","node_id":"n-1","attempt":2,"duration_ms":99}',
                               "output": '{"y": []}', "progress": "", "progress_message": ""})
    assert job.state is JobState.SUCCEEDED and job.state.final
    assert job.outcome == {"state": "succeeded", "node_id": "n-1", "attempt": 2, "duration_ms": 99}
    assert (job.finished_ms, job.output, job.progress, job.progress_message) == (1799999300000, '{"y": []}', None,
                                                                                 None)
    waiting = JobRecord.from_hash({**JOB, "state": "waiting", "node_id": ""})
    assert waiting.node_id is None


# --- each bad text, field by field --------------------------------------------------------


#: Stored text -> (as an integer, as a finite number), as the views always read them.
NUMBERS: dict[str, tuple[Any, Any]] = {
    "1e+17": (10**17, 1e17), "12": (12, 12.0), "-1": (-1, -1.0), "0.5": (0, 0.5), "-0.0": (0, -0.0),
    "nan": (None, None), "NaN": (None, None), "inf": (None, None), "-inf": (None, None), "Infinity": (None, None),
    "": (None, None), "abc": (None, None), "{": (None, None), "1e400": (None, None), " 7 ": (7, 7.0),
    HUGE: (int(HUGE), None), "9" * 5000: (None, None), "0x10": (None, None),
}
INT_FIELDS = ("session_started_ms", "registered_at_ms", "max_concurrent_jobs", "status_since_ms", "last_seen_ms",
              "last_heartbeat_ms", "running_jobs", "job_cooldown_until_ms", "drain_requested_ms", "drain_deadline_ms",
              "drain_jobs_at_start", "drain_ended_ms", "cordoned_ms")
#: Counts whose absence means none: an unreadable one is 0.
COUNT_FIELDS = ("gpu_count", "consecutive_ok", "consecutive_fail")
JOB_INT_FIELDS = ("timeout_ms", "max_attempts", "dispatch_timeout_ms", "priority", "queue_score", "submitted_ms",
                  "waiting_since_ms", "attempt", "assigned_ms", "acked_ms", "result_received_ms", "finished_ms")


@pytest.mark.parametrize("text", list(NUMBERS), ids=lambda t: t[:12])
def test_numbers(text: str) -> None:
    as_integer, as_number = NUMBERS[text]
    assert as_int(text) == as_integer and as_float(text) == as_number
    node, job = NodeRecord.from_hash({f: text for f in NODE}), JobRecord.from_hash({f: text for f in JOB})
    for name in INT_FIELDS:
        assert getattr(NodeRecord.from_hash({name: text}), name) == as_integer, name
        assert getattr(node, name) == as_integer, name
    for name in COUNT_FIELDS:
        assert getattr(node, name) == (as_integer or 0), name
    for state in FINAL_STATES:
        assert node.finished[state] == (as_integer or 0)
    for name in ("cpu_percent", "gpu_percent", "mem_percent"):
        assert getattr(node, name) == as_number and (as_number is None or math.isfinite(getattr(node, name)))
    for name in JOB_INT_FIELDS:
        assert getattr(job, name) == as_integer, name
    assert job.timeout_seconds == as_number and job.progress == as_number


@pytest.mark.parametrize("text", HOSTILE, ids=lambda t: t[:12])
def test_every_hostile_text_in_every_field(text: str) -> None:
    """The same text in every field at once: each falls back to its own default."""
    node = NodeRecord.from_hash({f: text for f in NODE})
    job = JobRecord.from_hash({f: text for f in JOB})
    for record in (node, job):
        for f in dataclasses.fields(record):
            value = getattr(record, f.name)
            if isinstance(value, float):
                assert math.isfinite(value), f.name
    for name in ("advanced_features", "hardware", "labels"):
        assert getattr(node, name) == as_json(text, {}) and isinstance(getattr(node, name), dict)
    assert isinstance(node.models, list) and all(isinstance(m, dict) for m in node.models)
    assert isinstance(job.attempts, list) and all(isinstance(a, dict) for a in job.attempts)
    assert isinstance(job.required_models, list) and isinstance(job.avoid, list)
    assert isinstance(job.node_selector, dict) and isinstance(job.needs, dict)
    assert node.status_text == text and job.state_text == text, "shown as stored"
    assert node.status == (text if text in tuple(NodeStatus) else None)
    assert job.state == (text if text in tuple(JobState) else None)
    assert (node.connected, node.gpu_available, node.accept_public, node.cordoned, node.drain_pending) == (
        (text == "1",) * 5)
    assert job.require_gpu == job.public == (text == "1")
    assert node.last_healthy == {"1": True, "0": False}.get(text)
    assert node.drain_requested == bool(text)
    for name in ("job_last_failure",):
        assert getattr(node, name) == (as_json(text, {}) or None)
    for name in ("last_decision", "outcome", "last_error"):
        assert getattr(job, name) == (as_json(text, {}) or None)
    # texts stay texts (some views show "" for none, some null; each as before)
    assert (node.status_reason, node.version, node.cordon_reason, node.window, node.job_window) == (text,) * 5
    assert (node.previous_status_text, node.drain_outcome, job.node_id, job.progress_message) == (text or None,) * 4
    assert (node.web_id, node.drain_requested_by, job.job_type, job.payload, job.output) == (text,) * 5


def test_unknown_words_are_kept_as_text_and_not_guessed() -> None:
    node = NodeRecord.from_hash({"status": "sideways", "previous_status": "READY"})
    assert (node.status, node.status_text, node.previous_status, node.previous_status_text) == (
        None, "sideways", None, "READY")
    job = JobRecord.from_hash({"state": "lost"})
    assert (job.state, job.state_text) == (None, "lost")
    assert NodeRecord.from_hash({}).status_text is None and JobRecord.from_hash({}).state_text is None


@pytest.mark.parametrize(("stored", "heartbeats", "since"), [
    ("4:1799999995000", 4, 1799999995000), ("2", 2, None), ("3:", 3, None), (":5", 0, 5), ("abc:123", 0, 123),
    ("1:2:3", 1, None), ("", 0, None), ("1e+17:1e+17", 10**17, 10**17), ("nan:inf", 0, None),
])
def test_running_mismatch(stored: str, heartbeats: int, since: int | None) -> None:
    node = NodeRecord.from_hash({"running_mismatch": stored})
    assert (node.mismatch_heartbeats, node.mismatch_since_ms) == (heartbeats, since)


def test_lists_of_objects_keep_only_objects() -> None:
    node = NodeRecord.from_hash({"models": '[{"model_id": "a"}, 1, "x", null, [], {"model_id": [1]}]'})
    assert node.models == [{"model_id": "a"}, {"model_id": [1]}]
    job = JobRecord.from_hash({"attempts": '[{"attempt": 1}, 2]', "required_models": '["a", 1]', "avoid": '[null]'})
    assert (job.attempts, job.required_models, job.avoid) == ([{"attempt": 1}], ["a", 1], [None])


def test_json_nested_too_deep_is_unreadable_not_an_error() -> None:
    assert as_json("[" * 100_000, []) == [] and as_json('{"a": ' * 50_000, {}) == {}
    assert NodeRecord.from_hash({"models": "[" * 100_000}).models == []


# --- never raises ---------------------------------------------------------------------------

@hsettings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(NodeRecord.FIELDS + JobRecord.FIELDS) | st.text(), texts))
def test_from_hash_never_raises(raw: dict[str, str]) -> None:
    NodeRecord.from_hash(raw)
    JobRecord.from_hash(raw)


@hsettings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(), st.text()))
def test_from_hash_never_raises_on_any_text(raw: dict[str, str]) -> None:
    NodeRecord.from_hash(raw)
    JobRecord.from_hash(raw)


def test_json_of_the_expected_type_or_the_default() -> None:
    assert as_json('{"zone": "eu"}', {}) == {"zone": "eu"}
    assert as_json("[1, 2]", {}) == {}, "a list where a dict belongs"
    assert as_json("{not json", []) == [] and as_json(None, []) == [] and as_json("", {}) == {}
