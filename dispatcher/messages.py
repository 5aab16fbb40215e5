"""The wire messages of the node protocol (contract section 1), as pydantic models.

Shared by the server and the node agent, so this module imports nothing else
of the dispatcher. Models are frozen; unknown fields are ignored so that a
newer peer's optional fields never break an older one; every field but
``type`` has a default unless the contract makes it required.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)

#: A node id the server accepts from a node: letters, digits, '-', '_', '.'.
NODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

NodeId = Annotated[str, StringConstraints(pattern=NODE_ID_PATTERN.pattern)]
ModelId = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^\S+$")]
LabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")]
LabelValue = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{0,63}$")]
Percent = Annotated[float, Field(ge=0, le=100)]
JobId = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Attempt = Annotated[int, Field(ge=1)]


class NodeStatus(str, enum.Enum):
    REGISTERING = "registering"
    READY = "ready"
    DEGRADED = "degraded"
    DRAINING = "draining"
    OFFLINE = "offline"


class ModelState(str, enum.Enum):
    READY = "ready"
    LOADING = "loading"
    DOWNLOADING = "downloading"
    ERROR = "error"


class ErrorCode(str, enum.Enum):
    NODE_ID_CONFLICT = "NODE_ID_CONFLICT"
    UNAUTHORIZED = "UNAUTHORIZED"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    NOT_REGISTERED = "NOT_REGISTERED"
    NODE_ID_MISMATCH = "NODE_ID_MISMATCH"
    RATE_LIMITED = "RATE_LIMITED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


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
    name: str = ""
    memory_gb: float = Field(0, ge=0)


class Hardware(_Wire):
    cpu_cores: int = Field(0, ge=0)
    memory_gb: float = Field(0, ge=0)
    gpus: list[Gpu] = Field(default_factory=list, max_length=64)


class ResourceUsage(_Wire):
    cpu_percent: Percent = 0
    gpu_percent: Percent | None = None
    mem_percent: Percent = 0
    running_jobs: int = Field(0, ge=0)


# --- node to server ----------------------------------------------------------


class NodeRegister(_Wire):
    type: Literal["node_register"]
    node_id: str | None = None  # validated by the registry: unknown ids must match NODE_ID_PATTERN
    node_secret: str | None = Field(None, max_length=512)
    registration_token: str | None = Field(None, max_length=512)
    version: str = Field("", max_length=100)
    capability_schema_version: str = Field("1.0", max_length=20)
    advanced_features: dict[str, Any] = Field(default_factory=dict)
    hardware: Hardware = Field(default_factory=Hardware)
    installed_models: list[InstalledModel] = Field(default_factory=list, max_length=500)
    accept_public_jobs: bool = False
    max_concurrent_jobs: int = Field(1, ge=1, le=1024)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=64)

    @field_validator("installed_models")
    @classmethod
    def _unique_models(cls, models: list[InstalledModel]) -> list[InstalledModel]:
        return _unique(models)


class NodeHeartbeat(_Wire):
    type: Literal["node_heartbeat"]
    node_id: str | None = None
    #: The node's own clock; informational only, liveness uses the server's.
    timestamp: int | None = None
    resource_usage: ResourceUsage = Field(default_factory=ResourceUsage)
    installed_models: list[InstalledModel] | None = Field(None, max_length=500)
    gpu_available: bool | None = None

    @field_validator("installed_models")
    @classmethod
    def _unique_models(cls, models: list[InstalledModel] | None) -> list[InstalledModel] | None:
        return None if models is None else _unique(models)


class JobAck(_Wire):
    type: Literal["job_ack"]
    job_id: JobId
    attempt: Attempt
    node_id: str | None = None


class JobProgress(_Wire):
    type: Literal["job_progress"]
    job_id: JobId
    attempt: Attempt
    progress: float | None = Field(None, ge=0, le=1)
    message: str | None = Field(None, max_length=1000)
    node_id: str | None = None


class NodeJobError(_Wire):
    code: str = Field("NODE_ERROR", max_length=100)
    message: str = Field("", max_length=10_000)
    retryable: bool = False


class JobResult(_Wire):
    type: Literal["job_result"]
    job_id: JobId
    attempt: Attempt
    success: bool
    output: Any = None
    error: NodeJobError | None = None
    duration_ms: int | None = Field(None, ge=0)
    node_id: str | None = None


class NodeDrain(_Wire):
    type: Literal["node_drain"]
    reason: str = Field("requested by the node", max_length=500)
    deadline_seconds: float | None = Field(None, gt=0)
    node_id: str | None = None


NodeMessage = Annotated[
    NodeRegister | NodeHeartbeat | JobAck | JobProgress | JobResult | NodeDrain,
    Field(discriminator="type"),
]
NODE_MESSAGE_TYPES = ("node_register", "node_heartbeat", "job_ack", "job_progress", "job_result", "node_drain")

# --- server to node ----------------------------------------------------------


class _Outbound(_Wire):
    # Built by the server from Python values (status strings, not enum members).
    model_config = ConfigDict(frozen=True, extra="ignore", strict=False)


class NodeRegisterAck(_Outbound):
    type: Literal["node_register_ack"] = "node_register_ack"
    node_id: str
    node_secret: str
    status: NodeStatus
    heartbeat_interval_seconds: float
    heartbeat_timeout_seconds: float


class NodeStatusMessage(_Outbound):
    type: Literal["node_status"] = "node_status"
    node_id: str
    status: NodeStatus
    previous_status: NodeStatus | None = None
    reason: str = ""
    timestamp: int
    #: Optional extensions of the periodic report.
    health: dict[str, Any] | None = None
    assigned_jobs: list[str] | None = None
    not_eligible: list[str] | None = None


class JobAssign(_Outbound):
    type: Literal["job_assign"] = "job_assign"
    job_id: str
    attempt: Attempt
    job_type: str
    payload: dict[str, Any] = Field(default_factory=dict)
    required_models: list[str] = Field(default_factory=list)
    require_gpu: bool = False
    timeout_seconds: float = 300


class JobCancel(_Outbound):
    type: Literal["job_cancel"] = "job_cancel"
    job_id: str
    attempt: Attempt
    reason: str = ""


class ErrorMessage(_Outbound):
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
    """Raised when a frame cannot be decoded; the message names the field at fault."""

    def __init__(self, message: str, ref_type: str | None = None) -> None:
        super().__init__(message)
        self.ref_type = ref_type


def decode_node_message(frame: str | bytes) -> NodeMessage:
    """Parse and validate one frame a node sent."""
    return _decode(_node_messages, frame, NODE_MESSAGE_TYPES)


def decode_server_message(frame: str | bytes) -> ServerMessage:
    """Parse and validate one frame the server sent (used by node agents)."""
    return _decode(_server_messages, frame, ("node_register_ack", "node_status", "job_assign", "job_cancel", "error"))


def _decode(adapter: TypeAdapter[Any], frame: str | bytes, known: tuple[str, ...]) -> Any:
    try:
        data = json.loads(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"frame is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DecodeError("frame must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise DecodeError("type: required string field is missing")
    if kind not in known:
        raise DecodeError(f"type: unknown message type {kind!r}", ref_type=kind)
    try:
        # JSON mode so that strict validation still reads dicts as models.
        return adapter.validate_json(frame if isinstance(frame, (str, bytes)) else json.dumps(data))
    except ValidationError as exc:
        raise DecodeError(describe_validation_error(exc, skip=1), ref_type=kind) from exc


def describe_validation_error(exc: ValidationError, skip: int = 0) -> str:
    """One line naming each failing field, e.g. ``resource_usage.cpu_percent: ...``."""
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"][skip:]) or "message"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _unique(models: list[InstalledModel]) -> list[InstalledModel]:
    seen: set[str] = set()
    for model in models:
        if model.model_id in seen:
            raise ValueError(f"model {model.model_id!r} is listed twice")
        seen.add(model.model_id)
    return models
