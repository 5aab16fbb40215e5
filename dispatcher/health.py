"""Whether one heartbeat is healthy, and the rules on job outcomes. The status rules
built on them live in the Lua scripts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dispatcher.settings import Settings
from dispatcher.vocabulary import ModelState


@dataclass(frozen=True)
class HealthVerdict:
    healthy: bool
    #: "healthy", or every reason the check failed, joined by "; ".
    reason: str


def check_health(
    model_states: Mapping[str, str],
    gpu_count: int,
    gpu_available: bool,
    required_models: Iterable[str],
    require_gpu: bool,
) -> HealthVerdict:
    """A node is healthy when every required model is ``ready`` and, if a GPU is
    required, it has one and reports it available."""
    problems = []
    for model_id in required_models:
        state = model_states.get(model_id)
        if state is None:
            problems.append(f"model {model_id} is not installed")
        elif state != ModelState.READY:
            problems.append(f"model {model_id} is {state}")
    if require_gpu:
        if gpu_count == 0:
            problems.append("no GPU")
        elif not gpu_available:
            problems.append("GPU not available")
    return HealthVerdict(not problems, "; ".join(problems) or "healthy")


def job_failure_rules(settings: Settings) -> dict[str, int]:
    """What the job scripts need to count an outcome against its node (their ``job_health``
    parameter): failures in a row, failures in the window, the window, the cool-down (ms)."""
    return {"consecutive": settings.job_failures_consecutive, "in_window": settings.job_failures_in_window,
            "window": settings.job_failures_window,
            "cooldown_ms": int(settings.job_failures_cooldown_seconds * 1000)}
