"""Whether one heartbeat is healthy. The status rules built on it live in the Lua scripts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


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
        elif state != "ready":
            problems.append(f"model {model_id} is {state}")
    if require_gpu:
        if gpu_count == 0:
            problems.append("no GPU")
        elif not gpu_available:
            problems.append("GPU not available")
    return HealthVerdict(not problems, "; ".join(problems) or "healthy")
