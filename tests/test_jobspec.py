"""dispatcher/jobspec.py alone: what a client may submit, refused naming the field; the
waiting order; what logs and Flower may say of a submission."""

from __future__ import annotations

import re

import pytest

from dispatcher.errors import InvalidJob
from dispatcher.jobspec import JobSpec, describe_submission

LIMIT = 1024


def test_only_the_job_type_is_required_and_the_rest_has_the_contracts_defaults() -> None:
    spec = JobSpec.parse("job-1", {"job_type": "asr"}, LIMIT)
    assert (spec.payload, spec.required_models, spec.require_gpu, spec.public, spec.node_selector) == (
        {}, [], False, False, {})
    assert (spec.timeout_seconds, spec.max_attempts, spec.dispatch_timeout_seconds, spec.priority, spec.fail_fast) == (
        300, 3, 300, 5, False)


@pytest.mark.parametrize(("job_id", "fields", "named"), [
    ("a:b", {"job_type": "asr"}, "job_id"),
    ("x" * 129, {"job_type": "asr"}, "job_id"),
    ("job-1", {}, "job_type"),
    ("job-1", {"job_type": "asr", "priority": 10}, "priority"),
    ("job-1", {"job_type": "asr", "max_attempts": 0}, "max_attempts"),
    ("job-1", {"job_type": "asr", "require_gpu": "yes"}, "require_gpu"),
    ("job-1", {"job_type": "asr", "timeout_seconds": 0}, "timeout_seconds"),
    ("job-1", {"job_type": "asr", "node_selector": {"bad key": "x"}}, "node_selector"),
    ("job-1", {"job_type": "asr", "required_models": ["has space"]}, "required_models"),
    ("job-1", {"job_type": "asr", "payload": [1, 2]}, "payload"),
    ("job-1", {"job_type": "asr", "colour": "blue"}, "colour"),
])
def test_what_a_client_gets_wrong_is_refused_naming_the_field(job_id: str, fields: dict[str, object],
                                                              named: str) -> None:
    with pytest.raises(InvalidJob, match=rf"^invalid job: {named}\b"):
        JobSpec.parse(job_id, fields, LIMIT)


def test_a_payload_larger_than_a_node_frame_may_carry_is_refused_with_its_size() -> None:
    JobSpec.parse("fits", {"job_type": "t", "payload": {"b": "x" * (LIMIT - 8)}}, LIMIT)  # {"b":"..."} is LIMIT bytes
    with pytest.raises(InvalidJob, match=re.escape(f"payload: {LIMIT + 1} bytes of JSON, more than the {LIMIT}")):
        JobSpec.parse("too-big", {"job_type": "t", "payload": {"b": "x" * (LIMIT - 7)}}, LIMIT)


def test_waiting_jobs_go_by_priority_then_by_age() -> None:
    def score(priority: int, submitted_ms: int) -> int:
        return JobSpec.parse("j", {"job_type": "t", "priority": priority}, LIMIT).queue_score(submitted_ms)
    late_urgent, early_urgent = score(9, 2_000_000_000_000), score(9, 1_000)
    early_plain, late_plain = score(5, 1_000), score(5, 2_000_000_000_000)
    assert early_urgent < late_urgent < early_plain < late_plain < score(0, 1_000)


def test_a_submission_is_described_without_its_payload() -> None:
    described = describe_submission({"job_type": "asr", "priority": 7, "payload": {"url": "https://signed?sig=s3cr3t",
                                                                                   "n": 1}})
    assert described == "{'job_type': 'asr', 'priority': 7} payload: <dict of 2 items, not shown>"
    assert describe_submission(["not", "kwargs"]) == "<list>"
    assert len(describe_submission({"job_type": "x" * 1000})) == 300
