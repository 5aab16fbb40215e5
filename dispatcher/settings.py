"""The dispatcher's configuration: one object, read once per process.

Sources, strongest first: environment variables (``DISPATCHER_<KEY>``, plus
``REDIS_URL`` and ``PORT``), then a TOML file (``DISPATCHER_CONFIG``, else
``config.toml`` in the working folder when present), then the defaults below.
The TOML file groups keys in tables (``[scheduler.node_health]`` and the
others in ``SECTIONS``); the environment names every key flat.
"""

from __future__ import annotations

import functools
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, StringConstraints, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from dispatcher.errors import ConfigError

#: Where each key lives in the TOML file. The environment ignores sections.
SECTIONS: dict[str, tuple[str, ...]] = {
    "scheduler.node_health": (
        "heartbeat_interval_seconds",
        "heartbeat_timeout_seconds",
        "warmup_timeout_seconds",
        "health_check_success_threshold",
        "failure_rate_window_size",
        "failure_rate_threshold",
        "consecutive_failure_threshold",
        "periodic_scan_interval_seconds",
        "required_models",
        "require_gpu",
        "status_report_interval_seconds",
        "partition_offline_fraction",
        "partition_offline_per_scan",
        "offline_node_retention_seconds",
    ),
    "scheduler.dispatch": (
        "resource_threshold_percent",
        "job_reassign_grace_seconds",
        "exclusion_examples",
        "dispatch_candidates",
        "waiting_kick_batch",
        "priority_queues",
    ),
    "server": (
        "max_message_bytes",
        "max_messages_per_second",
        "registration_tokens",
        "admin_token",
        "web_worker_connections",
        "http_connections_reserved",
        "ws_ping_interval_seconds",
        "ws_send_timeout_seconds",
        "registration_timeout_seconds",
        "max_unregistered_sessions",
        "max_unregistered_sessions_per_address",
        "allowed_origins",
        "trusted_proxy_hops",
        "delivery_sweep_interval_seconds",
        "gc_pause_log_ms",
        "log_level",
    ),
    "redis": (
        "key_prefix",
        "redis_max_connections",
        "redis_tls_verify",
    ),
}


class Settings(BaseSettings):
    """Every knob of the dispatcher. Units are in the names."""

    model_config = SettingsConfigDict(
        env_prefix="DISPATCHER_",
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    # [scheduler.node_health]
    heartbeat_interval_seconds: float = Field(15, gt=0)
    heartbeat_timeout_seconds: float = Field(45, gt=0)
    warmup_timeout_seconds: float = Field(60, gt=0)
    health_check_success_threshold: int = Field(3, ge=1)
    failure_rate_window_size: int = Field(5, ge=1, le=64)
    failure_rate_threshold: int = Field(3, ge=1)
    consecutive_failure_threshold: int = Field(3, ge=1)
    periodic_scan_interval_seconds: float = Field(30, gt=0)
    required_models: list[str] = Field(default_factory=list)
    require_gpu: bool = True
    status_report_interval_seconds: float = Field(30, gt=0)
    #: More than this fraction of ready nodes expiring in one scan looks like
    #: our own partition, not theirs: the scan then expires at a bounded rate.
    partition_offline_fraction: float = Field(0.5, gt=0, le=1)
    #: Nodes the scan takes offline per run while a partition is suspected.
    partition_offline_per_scan: int = Field(5, ge=1)
    #: A node offline and unheard of for this long is deleted (0: kept forever).
    offline_node_retention_seconds: float = Field(7 * 24 * 3600, ge=0)

    # [scheduler.dispatch]
    resource_threshold_percent: float = Field(25, gt=0, le=100)
    #: Seconds a lost node's jobs wait for it to resume; unset means the heartbeat timeout.
    job_reassign_grace_seconds: float | None = Field(None, ge=0)
    #: Example node ids kept per exclusion reason in each decision.
    exclusion_examples: int = Field(5, ge=0, le=100)
    #: Least-loaded candidates handed to the dispatch script per attempt (it takes the first
    #: that passes; the indexes they come from are exact but for a race or a silent node).
    dispatch_candidates: int = Field(3, ge=1, le=100)
    #: Waiting jobs tried per wake-up when capacity appears.
    waiting_kick_batch: int = Field(50, ge=1)
    #: Celery queues the workers read before the default one ("celery"), in this order:
    #: a client that must not wait behind another's flood submits to its own
    #: (``send_task("dispatcher.submit_job", queue=...)``).
    priority_queues: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")]] = Field(
        default_factory=list)

    # [server]
    max_message_bytes: int = Field(1024 * 1024, ge=1024)
    #: Frames per second one node session may send on average (bursts of twice that): enough
    #: for a node acking and answering short jobs on many slots, low enough to stop a flood.
    max_messages_per_second: float = Field(200, gt=0)
    registration_tokens: list[SecretStr] = Field(default_factory=list)
    admin_token: SecretStr | None = None
    #: gunicorn --worker-connections: node sessions plus HTTP requests per web process.
    web_worker_connections: int = Field(5000, ge=10)
    #: Of those, kept for HTTP: a process holding its most sessions still answers /healthz.
    http_connections_reserved: int = Field(100, ge=1)
    #: A session that has received nothing for this long is pinged; silent for twice as long, cut.
    ws_ping_interval_seconds: float | None = Field(25, gt=0)
    #: A node that does not take what is sent to it within this long is cut off.
    ws_send_timeout_seconds: float = Field(10, gt=0)
    #: A session that has not registered by then is closed (1008).
    registration_timeout_seconds: float = Field(10, gt=0)
    #: Sessions not yet registered, per web process (past it, the oldest is closed to make
    #: room) and per client address (past it, 503).
    max_unregistered_sessions: int = Field(1000, ge=1)
    max_unregistered_sessions_per_address: int = Field(64, ge=1)
    #: Browser origins allowed to open /ws/node (agents send no Origin and are always allowed).
    allowed_origins: list[str] = Field(default_factory=list)
    #: Proxies in front of the web process that append to X-Forwarded-For (Heroku's router: 1);
    #: 0 takes the client address from the connection itself.
    trusted_proxy_hops: int = Field(0, ge=0, le=10)
    #: The safety net for wake-ups lost outside a listener reconnect (which sweeps at once).
    delivery_sweep_interval_seconds: float = Field(10.0, gt=0)
    #: Garbage collections that stop the web process at least this long (ms) are logged (gc_pause).
    gc_pause_log_ms: float = Field(100, gt=0)
    log_level: str = "INFO"

    # [redis]
    key_prefix: str = Field("{dispatcher}", min_length=1)
    #: Connections in each process's pool for the dispatcher's own records.
    redis_max_connections: int = Field(50, ge=2)
    #: Verify the server certificate of a rediss:// URL (Heroku's Redis has a self-signed one).
    redis_tls_verify: bool = False

    # Platform conventions, not prefixed.
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "DISPATCHER_REDIS_URL", "redis_url"),
    )
    port: int = Field(8000, ge=1, le=65535, validation_alias=AliasChoices("PORT", "port"))

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if self.http_connections_reserved >= self.web_worker_connections:
            raise ValueError(
                "http_connections_reserved must be below web_worker_connections "
                f"({self.http_connections_reserved} >= {self.web_worker_connections})"
            )
        if self.failure_rate_threshold > self.failure_rate_window_size:
            raise ValueError(
                "failure_rate_threshold must not exceed failure_rate_window_size "
                f"({self.failure_rate_threshold} > {self.failure_rate_window_size})"
            )
        return self

    @property
    def max_sessions(self) -> int:
        """Node sessions one web process holds at most (registered or not)."""
        return self.web_worker_connections - self.http_connections_reserved

    @property
    def reassign_grace_seconds(self) -> float:
        if self.job_reassign_grace_seconds is None:
            return self.heartbeat_timeout_seconds
        return self.job_reassign_grace_seconds

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = InitSettingsSource(settings_cls, read_toml(config_path()))
        return (init_settings, env_settings, toml)


def config_path() -> Path | None:
    """The TOML file to read, or None when there is none."""
    named = os.environ.get("DISPATCHER_CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(f"DISPATCHER_CONFIG names {named!r}, which is not a file")
        return path
    default = Path("config.toml")
    return default if default.is_file() else None


def read_toml(path: Path | None) -> dict[str, Any]:
    """Flatten the known tables of a TOML file into one dict of keys."""
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    flat: dict[str, Any] = {}
    for section, keys in SECTIONS.items():
        table: Any = data
        for part in section.split("."):
            table = table.get(part, {}) if isinstance(table, dict) else {}
        if not isinstance(table, dict):
            continue
        for key, value in table.items():
            if isinstance(value, dict):
                continue  # a nested table, visited under its own section
            if key not in keys:
                raise ConfigError(f"{path}: unknown key {key!r} in [{section}]; known: {', '.join(keys)}")
            flat[key] = value
    return flat


def load_settings(**overrides: Any) -> Settings:
    """Read the configuration now; raise ConfigError with every problem named."""
    try:
        return Settings(**overrides)
    except SettingsError as exc:
        raise ConfigError(f"invalid configuration: {exc} (lists in the environment are JSON arrays: '[\"a\", \"b\"]')") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return load_settings()
