"""dispatcher/health.py alone: whether one heartbeat is healthy, and why not, in words an
operator reads in a node's status reason; and the job-failure rules the scripts receive."""

from __future__ import annotations

from typing import Any

from dispatcher.health import HealthVerdict, check_health, job_failure_rules


def test_healthy_when_every_required_model_is_ready_and_no_gpu_is_required() -> None:
    assert check_health({"whisper": "ready", "extra": "error"}, 0, False, ["whisper"], False) == \
        HealthVerdict(True, "healthy")
    assert check_health({}, 0, False, [], False) == HealthVerdict(True, "healthy"), "nothing required"


def test_every_problem_is_named_in_the_order_required() -> None:
    verdict = check_health({"whisper": "loading", "llama": "ready"}, 0, True, ["whisper", "nllb", "llama"], True)
    assert verdict == HealthVerdict(False, "model whisper is loading; model nllb is not installed; no GPU")


def test_a_required_gpu_must_be_there_and_available() -> None:
    assert check_health({}, 1, False, [], True) == HealthVerdict(False, "GPU not available")
    assert check_health({}, 1, True, [], True) == HealthVerdict(True, "healthy")
    assert check_health({}, 2, False, [], False).healthy, "not required: not checked"


def test_the_job_failure_rules_come_from_the_settings_in_the_scripts_units(plain_settings: Any) -> None:
    settings = plain_settings(job_failures_consecutive=4, job_failures_in_window=6, job_failures_window=8,
                              job_failures_cooldown_seconds=1.5)
    assert job_failure_rules(settings) == {"consecutive": 4, "in_window": 6, "window": 8, "cooldown_ms": 1500}
