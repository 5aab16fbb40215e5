"""The dispatch filter in Python: the same steps as ``lua/dispatch_job.lua``,
evaluated in full to explain a decision (every node, or one node, every step
with the values compared). The script decides; this explains.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dispatcher.records import NodeRecord
from dispatcher.vocabulary import Exclusion, ModelState, NodeStatus

#: The node hash fields the filter reads.
NODE_FIELDS = ("status", "last_seen_ms", "accept_public", "labels", "gpu_available", "models",
               "max_concurrent_jobs", "cpu_percent", "gpu_percent", "mem_percent", "cordoned", "cordon_reason")


@dataclass(frozen=True)
class JobNeeds:
    """What the filter needs to know of a job."""

    required_models: tuple[str, ...] = ()
    require_gpu: bool = False
    public: bool = False
    node_selector: tuple[tuple[str, str], ...] = ()

    #: The job hash fields a JobNeeds is read from (HMGET them, then ``from_values``).
    FIELDS = ("required_models", "require_gpu", "public", "node_selector")

    @classmethod
    def from_values(cls, values: list[str | None]) -> JobNeeds | None:
        """From an HMGET of ``FIELDS``; None when the job does not exist."""
        return None if values[0] is None else cls.from_stored(dict(zip(cls.FIELDS, values, strict=True)))

    @classmethod
    def from_stored(cls, job: Mapping[str, str | None]) -> JobNeeds:
        return cls(tuple(json.loads(job.get("required_models") or "[]")), job.get("require_gpu") == "1",
                   job.get("public") == "1", tuple(sorted(json.loads(job.get("node_selector") or "{}").items())))

    def to_json(self) -> str:
        """The needs in one canonical text: jobs that need the same are of one kind."""
        return json.dumps({"required_models": sorted(set(self.required_models)), "require_gpu": self.require_gpu,
                           "public": self.public, "node_selector": dict(sorted(self.node_selector))},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> JobNeeds:
        data = json.loads(text)
        return cls(tuple(data["required_models"]), data["require_gpu"], data["public"],
                   tuple(sorted(data["node_selector"].items())))

    @functools.cached_property
    def kind(self) -> str:
        """The id of this kind of needs (what a waiting job waits with)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Step:
    name: str
    reason: str
    passed: bool
    #: The values compared, for a person: "status ready", "cpu 80% >= 25%".
    detail: str


def _seconds(ms: float) -> float:
    """Milliseconds in seconds; past a float's range (a corrupt record's time), infinite, as Lua reads it."""
    try:
        return ms / 1000
    except OverflowError:
        return math.inf if ms > 0 else -math.inf


def evaluate(node: NodeRecord | Mapping[str, str | None], assigned: int, needs: JobNeeds, now_ms: int,
             heartbeat_timeout_ms: int, resource_threshold: float) -> list[Step]:
    """Every step of the filter for one stored node (its record, or its NODE_FIELDS as read)."""
    if not isinstance(node, NodeRecord):
        node = NodeRecord.from_hash(node)
    status = node.status_text or "unknown"
    silent_ms = now_ms - (node.last_seen_ms or 0)
    # (a model id that is not a text matches no required model, and may not be hashable)
    ready_models = {m.get("model_id") for m in node.models if m.get("status") == ModelState.READY
                    and isinstance(m.get("model_id"), str)}
    missing_labels = [f"{k}={v}" for k, v in needs.node_selector if node.labels.get(k) != v]
    missing_models = [m for m in needs.required_models if m not in ready_models]
    max_jobs = node.max_concurrent_jobs or 1
    usage = {"cpu": node.cpu_percent or 0.0, "gpu": node.gpu_percent or 0.0, "mem": node.mem_percent or 0.0}
    over = [f"{k} {v:g}% >= {resource_threshold:g}%" for k, v in usage.items() if v >= resource_threshold]
    return [
        Step("status", Exclusion.STATUS_NOT_READY, status == NodeStatus.READY, f"status {status}"),
        Step("online", Exclusion.STATUS_NOT_READY, silent_ms < heartbeat_timeout_ms,
             f"last heard {_seconds(silent_ms):.1f} s ago (timeout {heartbeat_timeout_ms / 1000:g} s)"),
        Step("public_pool", Exclusion.NOT_IN_PUBLIC_POOL, not needs.public or node.accept_public,
             "job is not public" if not needs.public else
             f"accepts public jobs: {'yes' if node.accept_public else 'no'}"),
        Step("node_selector", Exclusion.NODE_SELECTOR_MISMATCH, not missing_labels,
             f"missing labels {', '.join(missing_labels)}" if missing_labels else
             ("labels match" if needs.node_selector else "no selector")),
        Step("gpu", Exclusion.GPU_UNAVAILABLE, not needs.require_gpu or node.gpu_available,
             "job needs no GPU" if not needs.require_gpu else
             f"GPU available: {'yes' if node.gpu_available else 'no'}"),
        Step("models", Exclusion.MODEL_NOT_AVAILABLE, not missing_models,
             f"not ready: {', '.join(missing_models)}" if missing_models else
             (f"ready: {', '.join(needs.required_models)}" if needs.required_models else "no models required")),
        Step("cordon", Exclusion.NODE_CORDONED, not node.cordoned,
             f"cordoned: {node.cordon_reason or 'no reason given'}" if node.cordoned else "not cordoned"),
        Step("capacity", Exclusion.CAPACITY_EXCEEDED, assigned < max_jobs, f"{assigned}/{max_jobs} slots used"),
        Step("resources", Exclusion.RESOURCE_THRESHOLD_EXCEEDED, not over,
             "; ".join(over) if over else
             f"cpu {usage['cpu']:g}%, gpu {usage['gpu']:g}%, mem {usage['mem']:g}% < {resource_threshold:g}%"),
    ]


def first_failure(steps: list[Step]) -> Step | None:
    return next((step for step in steps if not step.passed), None)


def summarize(eligible: int, total: int, counts: Mapping[str, int], examples: Mapping[str, list[str]]) -> str:
    """``0/12 nodes eligible: 5 StatusNotReady, 4 ModelNotAvailable (StatusNotReady: n-1, n-2; ...)``."""
    parts = [f"{counts[r]} {r}" for r in Exclusion if counts.get(r)]
    text = f"{eligible}/{total} nodes eligible" + (f": {', '.join(parts)}" if parts else "")
    shown = [f"{r}: {', '.join(examples[r])}" for r in Exclusion if examples.get(r)]
    return text + (f" (e.g. {'; '.join(shown)})" if shown else "")


def explanation(counts: Mapping[str, int], examples: Mapping[str, list[str]]) -> dict[str, Any]:
    return {"counts": {r: counts[r] for r in Exclusion if counts.get(r)},
            "examples": {r: examples[r] for r in Exclusion if examples.get(r)}}
