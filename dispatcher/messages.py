"""The wire messages of the node protocol (contract section 1), as pydantic models.

Shared by the server and the node agent, so this module imports nothing else
of the dispatcher but its vocabulary. Models are frozen; unknown fields are ignored so that a
newer peer's optional fields never break an older one; every field but
``type`` has a default unless the contract makes it required.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
)

from dispatcher.vocabulary import ErrorCode, ModelState, NodeStatus

#: A node id the server accepts from a node: letters, digits, '-', '_', '.' (use ``fullmatch``).
NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: A job id (the Celery task id): the same alphabet, longer (a UUID, or a client's own scheme).
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")

#: Deepest nesting of a JSON value a frame may carry (payload, output, features). The
#: frame around it adds a level or two; pydantic's parser, which the agent uses too,
#: stops at 200, and no JavaScript or Go parser in common use stops earlier.
MAX_JSON_DEPTH = 64
#: Largest count a frame may carry (running jobs, CPU cores, attempts).
MAX_COUNT = 1_000_000
#: ``advanced_features`` of one node, as JSON.
MAX_FEATURES_BYTES = 8 * 1024
#: Models one node may list.
MAX_MODELS = 256
#: A duration or time the server accepts, in ms: about 3 years (times are ms since 1970).
MAX_MS = 2**53


def check_json_value(value: Any, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``value`` unchanged, or ValueError when it nests deeper than ``max_depth`` or
    holds a number JSON cannot carry (NaN, Infinity: Python's parsers accept them,
    most others refuse the text they become)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{item} is not a JSON number")
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise ValueError(f"nested deeper than {max_depth} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, float)))
    return value


#: Any JSON value, finite and at most MAX_JSON_DEPTH deep.
JsonValue = Annotated[Any, AfterValidator(check_json_value)]
JsonObject = Annotated[dict[str, Any], AfterValidator(check_json_value)]

NodeId = Annotated[str, StringConstraints(pattern=f"^{NODE_ID_PATTERN.pattern}$")]
JobId = Annotated[str, StringConstraints(pattern=f"^{JOB_ID_PATTERN.pattern}$")]
ModelId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^\S+$")]
LabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")]
LabelValue = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{0,63}$")]
Percent = Annotated[float, Field(ge=0, le=100)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Attempt = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Size = Annotated[float, Field(ge=0, le=MAX_COUNT)]


def integral_numbers(value: Any) -> Any:
    """``value`` with every float that holds a whole number made an int, in lists and
    dicts too: ``15.0`` -> ``15``."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: integral_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral_numbers(v) for v in value]
    return value


def valid_node_id(node_id: str) -> bool:
    return NODE_ID_PATTERN.fullmatch(node_id) is not None


def valid_job_id(job_id: str) -> bool:
    return JOB_ID_PATTERN.fullmatch(job_id) is not None


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    def encode(self) -> str:
        """The frame's JSON text."""
        return self.model_dump_json(exclude_none=False)


class InstalledModel(_Wire):
    model_id: ModelId
    status: ModelState

    @field_validator("status", mode="before")
    @classmethod
    def _case_insensitive(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class Gpu(_Wire):
    name: str = Field("", max_length=200)
    memory_gb: Size = 0


class Hardware(_Wire):
    cpu_cores: Count = 0
    memory_gb: Size = 0
    gpus: list[Gpu] = Field(default_factory=list, max_length=64)


class ResourceUsage(_Wire):
    cpu_percent: Percent = 0
    gpu_percent: Percent | None = None
    mem_percent: Percent = 0
    running_jobs: Count = 0


# --- node to server ----------------------------------------------------------


class NodeRegister(_Wire):
    """The first frame of a session: who the node is and what it has."""

    type: Literal["node_register"]
    node_id: NodeId | None = None
    node_secret: str | None = Field(None, max_length=512)
    registration_token: str | None = Field(None, max_length=512)
    version: str = Field("", max_length=100)
    capability_schema_version: str = Field("1.0", max_length=20)
    advanced_features: JsonObject = Field(default_factory=dict)
    hardware: Hardware = Field(default_factory=Hardware)
    installed_models: list[InstalledModel] = Field(default_factory=list, max_length=MAX_MODELS)
    accept_public_jobs: bool = False
    max_concurrent_jobs: int = Field(1, ge=1, le=1024)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=64)

    @field_validator("installed_models")
    @classmethod
    def _unique_models(cls, models: list[InstalledModel]) -> list[InstalledModel]:
        return _unique(models)

    @field_validator("advanced_features")
    @classmethod
    def _small_features(cls, features: dict[str, Any]) -> dict[str, Any]:
        # Stored with the node and shown in every view of it: keep each record small.
        size = len(json.dumps(features, separators=(",", ":")))
        if size > MAX_FEATURES_BYTES:
            raise ValueError(f"{size} bytes of JSON, more than {MAX_FEATURES_BYTES}")
        return features


class NodeHeartbeat(_Wire):
    """Every heartbeat_interval_seconds: usage and model statuses, judged for health."""

    type: Literal["node_heartbeat"]
    node_id: NodeId | None = None
    #: The node's own clock; informational only, liveness uses the server's.
    timestamp: int | None = Field(None, ge=0, le=MAX_MS)
    resource_usage: ResourceUsage = Field(default_factory=ResourceUsage)
    installed_models: list[InstalledModel] | None = Field(None, max_length=MAX_MODELS)
    gpu_available: bool | None = None

    @field_validator("installed_models")
    @classmethod
    def _unique_models(cls, models: list[InstalledModel] | None) -> list[InstalledModel] | None:
        return None if models is None else _unique(models)


class JobAck(_Wire):
    """The node has the attempt and has started it."""

    type: Literal["job_ack"]
    job_id: JobId
    attempt: Attempt
    node_id: NodeId | None = None


class JobProgress(_Wire):
    """How far the node is with an attempt (optional)."""

    type: Literal["job_progress"]
    job_id: JobId
    attempt: Attempt
    progress: float | None = Field(None, ge=0, le=1)
    message: str | None = Field(None, max_length=1000)
    node_id: NodeId | None = None


class NodeJobError(_Wire):
    code: str = Field("NODE_ERROR", max_length=100)
    message: str = Field("", max_length=10_000)
    retryable: bool = False
    #: The node's own failure (CUDA error, out of memory, a crashed model), not the job's.
    node_fault: bool = False


class JobResult(_Wire):
    """The end of an attempt: the node's output, or its error."""

    type: Literal["job_result"]
    job_id: JobId
    attempt: Attempt
    success: bool
    output: JsonValue = None
    error: NodeJobError | None = None
    duration_ms: int | None = Field(None, ge=0, le=MAX_MS)
    node_id: NodeId | None = None


class NodeDrain(_Wire):
    """The node asks to be drained: no new jobs; it finishes what it has."""

    type: Literal["node_drain"]
    reason: str = Field("requested by the node", max_length=500)
    deadline_seconds: float | None = Field(None, gt=0, le=MAX_COUNT)
    node_id: NodeId | None = None


NodeMessage = Annotated[
    NodeRegister | NodeHeartbeat | JobAck | JobProgress | JobResult | NodeDrain,
    Field(discriminator="type"),
]
NODE_MESSAGE_TYPES = ("node_register", "node_heartbeat", "job_ack", "job_progress", "job_result", "node_drain")

# --- server to node ----------------------------------------------------------


class _Outbound(_Wire):
    # Built by the server from Python values (status strings, not enum members).
    model_config = ConfigDict(frozen=True, extra="ignore", strict=False)
    #: Fields that carry a client's or a node's own JSON, sent exactly as given.
    _verbatim: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _integral_numbers(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Settings and stored values are floats (timeouts accept 0.5), but a peer may read
        # its counts and intervals as integers: 15, never 15.0, whatever the field's type.
        data = handler(self)
        return {k: v if k in self._verbatim else integral_numbers(v) for k, v in data.items()}


class NodeRegisterAck(_Outbound):
    """The answer to node_register: the node's id and secret, and its heartbeat timing."""

    type: Literal["node_register_ack"] = "node_register_ack"
    node_id: NodeId
    node_secret: str
    status: NodeStatus
    heartbeat_interval_seconds: float
    heartbeat_timeout_seconds: float


class HealthSummary(_Outbound):
    #: The health checks of the current status, oldest first: "1" passed, "0" failed;
    #: at most ``failure_rate_window_size`` of them, "" right after a transition.
    window: str = ""
    window_failures: int = 0
    consecutive_ok: int = 0
    consecutive_fail: int = 0
    #: The last check's verdict (null before the first).
    last_healthy: bool | None = None
    last_reason: str = ""


class NodeStatusMessage(_Outbound):
    """The node's status: on every transition (periodic false), and every
    status_report_interval_seconds with the current status (periodic true)."""

    type: Literal["node_status"] = "node_status"
    node_id: NodeId
    status: NodeStatus
    previous_status: NodeStatus | None = None
    reason: str = ""
    timestamp: int
    #: True for the report sent every status_report_interval_seconds, false for a transition.
    periodic: bool = False
    #: Optional extensions of the periodic report.
    health: HealthSummary | None = None
    assigned_jobs: list[str] | None = None
    not_eligible: list[str] | None = None


class JobAssign(_Outbound):
    """An attempt of a job for the node to run; delivered at least once."""

    _verbatim = frozenset({"payload"})

    type: Literal["job_assign"] = "job_assign"
    job_id: JobId
    attempt: Attempt
    job_type: str
    payload: JsonObject = Field(default_factory=dict)
    required_models: list[str] = Field(default_factory=list)
    require_gpu: bool = False
    timeout_seconds: float = 300


class JobCancel(_Outbound):
    """Stop an attempt: cancelled, timed out, or taken back at a drain deadline."""

    type: Literal["job_cancel"] = "job_cancel"
    job_id: JobId
    attempt: Attempt
    reason: str = ""


class ErrorMessage(_Outbound):
    """A frame was refused or could not be handled."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    ref_type: str | None = None


ServerMessage = Annotated[
    NodeRegisterAck | NodeStatusMessage | JobAssign | JobCancel | ErrorMessage,
    Field(discriminator="type"),
]

_node_messages: TypeAdapter[NodeMessage] = TypeAdapter(NodeMessage)
_server_messages: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)


class DecodeError(ValueError):
    """Raised when a frame cannot be decoded; the message names the field at fault.
    ``ref_type`` is the frame's type when it is one of the known types."""

    def __init__(self, message: str, ref_type: str | None = None) -> None:
        super().__init__(message)
        self.ref_type = ref_type


def decode_node_message(frame: str | bytes) -> NodeMessage:
    """Parse and validate one frame a node sent."""
    return _decode(_node_messages, frame)


def decode_server_message(frame: str | bytes) -> ServerMessage:
    """Parse and validate one frame the server sent (used by node agents)."""
    return _decode(_server_messages, frame)


def _decode(adapter: TypeAdapter[Any], frame: str | bytes) -> Any:
    # One pass: pydantic parses and validates together, and its parser refuses
    # nesting deeper than 200 levels instead of recursing until the stack ends.
    try:
        return adapter.validate_json(frame)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        kind, ctx = first["type"], first.get("ctx") or {}
        if kind == "json_invalid":
            raise DecodeError(f"frame is not JSON: {ctx.get('error', first['msg'])}") from None
        if kind in ("dict_type", "model_type", "model_attributes_type"):
            raise DecodeError("frame must be a JSON object") from None
        if kind == "union_tag_not_found":
            raise DecodeError("type: required string field is missing") from None
        if kind == "union_tag_invalid":
            raise DecodeError(f"type: unknown message type {str(ctx.get('tag'))[:64]!r}") from None
        raise DecodeError(describe_validation_error(exc, skip=1), ref_type=str(first["loc"][0])) from None


def describe_validation_error(exc: ValidationError, skip: int = 0) -> str:
    """One line naming each failing field, e.g. ``resource_usage.cpu_percent: ...``."""
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        # A location may hold a key the peer chose (a label): never echo much of it.
        loc = ".".join(str(p)[:64] for p in err["loc"][skip:]) or "message"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _unique(models: list[InstalledModel]) -> list[InstalledModel]:
    seen: set[str] = set()
    for model in models:
        if model.model_id in seen:
            raise ValueError(f"model {model.model_id!r} is listed twice")
        seen.add(model.model_id)
    return models
