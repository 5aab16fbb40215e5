"""What a client may submit (``dispatcher.submit_job`` kwargs, contract section 4)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.errors import InvalidJob
from dispatcher.messages import (
    JOB_ID_PATTERN,
    JsonObject,
    LabelKey,
    LabelValue,
    ModelId,
    describe_validation_error,
    valid_job_id,
)

#: The waiting queue's scores: (MAX_PRIORITY - priority) * QUEUE_BAND + submission time (ms).
MAX_PRIORITY = 9
QUEUE_BAND = 10**13


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    job_type: str = Field(min_length=1, max_length=100)
    payload: JsonObject = Field(default_factory=dict)
    required_models: list[ModelId] = Field(default_factory=list, max_length=100)
    require_gpu: bool = False
    public: bool = False
    #: How long a node may work on one attempt.
    timeout_seconds: float = Field(300, gt=0, le=7 * 24 * 3600)
    max_attempts: int = Field(3, ge=1, le=100)
    #: How long the job may wait for an eligible node.
    dispatch_timeout_seconds: float = Field(300, ge=0, le=7 * 24 * 3600)
    #: 0-9, higher first among waiting jobs.
    priority: int = Field(5, ge=0, le=MAX_PRIORITY)
    node_selector: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=64)
    #: Fail at once (NoEligibleNode) when no registered node could ever take the job (its
    #: models, GPU, public pool, selector), instead of waiting out dispatch_timeout_seconds.
    #: Off by default: a fleet that scales up on demand gets its nodes while the job waits.
    fail_fast: bool = False

    @classmethod
    def parse(cls, job_id: str, fields: dict[str, Any], max_payload_bytes: int) -> JobSpec:
        """Validate a job id and its submitted kwargs; InvalidJob names every field at fault."""
        if not isinstance(job_id, str) or not valid_job_id(job_id):
            # The id names the job's keys and the node's frames: refuse it before anything is written.
            raise InvalidJob(f"invalid job: job_id: must match {JOB_ID_PATTERN.pattern} "
                             f"(letters, digits, '-', '_', '.'; at most 128)")
        try:
            spec = cls.model_validate(fields)
        except ValidationError as exc:
            raise InvalidJob(f"invalid job: {describe_validation_error(exc)}") from exc
        size = len(spec.payload_json().encode())
        if size > max_payload_bytes:
            raise InvalidJob(f"invalid job: payload: {size} bytes of JSON, more than the {max_payload_bytes} "
                             "a node frame may carry")
        return spec

    def payload_json(self) -> str:
        return json.dumps(self.payload, separators=(",", ":"), allow_nan=False)

    def queue_score(self, submitted_ms: int) -> int:
        """Waiting order: higher priority first, then first submitted."""
        return (MAX_PRIORITY - self.priority) * QUEUE_BAND + submitted_ms


#: Submitted fields shown in logs and task events; the payload never is.
_SHOWN = ("job_type", "required_models", "require_gpu", "public", "priority", "timeout_seconds",
          "dispatch_timeout_seconds", "max_attempts", "node_selector", "fail_fast")


def describe_submission(fields: Any) -> str:
    """What a log line or Flower may say of a submission: the small fields, and only the
    size of the payload (it may hold signed URLs or a user's data)."""
    if not isinstance(fields, dict):
        return f"<{type(fields).__name__}>"
    shown = {k: fields[k] for k in _SHOWN if k in fields}
    text = repr(shown)[:300]
    if "payload" in fields:
        payload = fields["payload"]
        size = len(payload) if isinstance(payload, (dict, list, str)) else 1
        text += f" payload: <{type(payload).__name__} of {size} items, not shown>"
    return text
