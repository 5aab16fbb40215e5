"""The dispatcher's configuration: one object, read once per process.

Sources, strongest first: environment variables (``DISPATCHER_<KEY>``, plus
``REDIS_URL`` and ``PORT``), then a TOML file (``DISPATCHER_CONFIG``, else
``config.toml`` in the working folder when present), then the defaults below.
The TOML file groups keys in tables (``[scheduler.node_health]`` and the
others in ``SECTIONS``); the environment names every key flat.

Neither source may name what the dispatcher does not read: a misspelt key
would otherwise leave its default in force without a word (an admin token
that guards nothing). A key out of place, an unknown table or an unknown
``DISPATCHER_*`` variable stops the process, named, with the right name or
place when one is close.
"""

from __future__ import annotations

import difflib
import functools
import os
import tomllib
from collections.abc import Mapping
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
        "job_failures_consecutive",
        "job_failures_in_window",
        "job_failures_window",
        "job_failures_cooldown_seconds",
        "running_jobs_mismatch_heartbeats",
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
        "metrics_node_series",
    ),
    "redis": (
        "key_prefix",
        "redis_max_connections",
        "redis_tls_verify",
    ),
}
#: The table each key lives in.
HOME: dict[str, str] = {key: section for section, keys in SECTIONS.items() for key in keys}
#: Tables that may appear in the file: the sections and the tables that hold them ([scheduler]).
TABLES: frozenset[str] = frozenset(
    ".".join(section.split(".")[:depth]) for section in SECTIONS for depth in range(1, section.count(".") + 2))
#: Settings read from the environment only, by their platform names.
ENVIRONMENT_ONLY: dict[str, str] = {"redis_url": "REDIS_URL", "port": "PORT"}
#: Variables under the settings' prefix that are not settings: the CLI's and the agent's,
#: which share the environment of a local run (``dispatcher up``) and of a platform's config vars.
OTHER_VARIABLES: frozenset[str] = frozenset({
    "DISPATCHER_CONFIG",
    "DISPATCHER_URL",
    "DISPATCHER_NODE_URL",
    "DISPATCHER_AGENT_STATE",
    "DISPATCHER_REGISTRATION_TOKEN",
})
ENV_PREFIX = "DISPATCHER_"


class Settings(BaseSettings):
    """Every knob of the dispatcher. Units are in the names."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
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
    #: A ready node whose last this many jobs failed by its own fault (a node_fault error or
    #: a timeout) is degraded for JobFailures ...
    job_failures_consecutive: int = Field(5, ge=1)
    #: ... or when this many of its last ``job_failures_window`` jobs did (both at most the window).
    job_failures_in_window: int = Field(7, ge=1)
    job_failures_window: int = Field(10, ge=1, le=64)
    #: Seconds a node degraded for JobFailures stays out of ready, however healthy its heartbeats.
    job_failures_cooldown_seconds: float = Field(300, ge=0)
    #: Heartbeats in a row whose running_jobs differs from the node's assigned jobs before the
    #: disagreement is logged (running_jobs_mismatch) and counted.
    running_jobs_mismatch_heartbeats: int = Field(3, ge=1)

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
    #: Nodes given series of their own in /metrics (status, slots, jobs finished), the first
    #: in id order; 0: none. Each costs a few series and two Redis reads per scrape, so
    #: the fleet's totals are the default and a dashboard of nodes is asked for, bounded.
    metrics_node_series: int = Field(0, ge=0, le=100_000)

    # [redis]
    key_prefix: str = Field("{dispatcher}", min_length=1)
    #: The size of every growing Redis pool of each process: the dispatcher's records, Celery's
    #: result backend, each broker channel's. With the fixed ones
    #: (a BRPOP, a subscription, a completions reader...) it makes each process's share of
    #: the Redis plan's client limit (docs/operations.md, the connection budget).
    redis_max_connections: int = Field(4, ge=2)
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
        for part in ("job_failures_in_window", "job_failures_consecutive"):
            if getattr(self, part) > self.job_failures_window:
                raise ValueError(f"{part} must not exceed job_failures_window "
                                 f"({getattr(self, part)} > {self.job_failures_window})")
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
        unknown = unknown_variables(os.environ)
        if unknown:
            raise ConfigError("; ".join(unknown))
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
    """Flatten the tables of a TOML file into one dict of keys; raise ConfigError naming
    every key the file has out of place."""
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    flat: dict[str, Any] = {}
    problems: list[str] = []
    _flatten(data, "", flat, problems)
    if problems:
        raise ConfigError(f"{path}: {'; '.join(problems)}")
    return flat


def _flatten(table: dict[str, Any], at: str, flat: dict[str, Any], problems: list[str]) -> None:
    """Collect the keys of ``table`` (the table named ``at``, "" for the top) that are in
    their place into ``flat``, and say what is wrong with each of the others."""
    for name, value in table.items():
        path = f"{at}.{name}" if at else name
        if isinstance(value, dict):
            if not value and path not in TABLES:
                problems.append(f"unknown table [{path}]{_table_like(path)}")
            _flatten(value, path, flat, problems)
        elif HOME.get(name) == at:
            flat[name] = value
        else:
            problems.append(_misplaced(name, at, path))


def _misplaced(key: str, at: str, path: str) -> str:
    """What is wrong with ``key`` found in the table ``at``, and where it belongs when we know."""
    where = f"[{at}]" if at else "the top level"
    if path in TABLES:
        return f"[{path}] must be a table, not a value"
    if key in HOME:
        if at in TABLES or not at:
            return f"key `{key}` belongs in [{HOME[key]}], not {where}"
        return f"unknown key {path}; did you mean [{HOME[key]}]?"
    if key in ENVIRONMENT_ONLY:
        return f"key `{key}` is not read from the file: set {ENVIRONMENT_ONLY[key]} in the environment"
    close = difflib.get_close_matches(key, HOME, 1)
    if close:
        there = "" if HOME[close[0]] == at else f" in [{HOME[close[0]]}]"
        return f"unknown key {path}; did you mean `{close[0]}`{there}?"
    return f"unknown key {path}{_table_like(at or path)}"


def _table_like(table: str) -> str:
    """A suggestion for a table name that is not one of ours ("" for one that is)."""
    close = [] if table in TABLES else difflib.get_close_matches(table, TABLES, 1)
    return f"; did you mean [{close[0]}]?" if close else ""


def environment_names() -> dict[str, str]:
    """Every variable a setting is read from, upper-cased (as the settings match them),
    with the setting's name."""
    names: dict[str, str] = {}
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [ENV_PREFIX + field]
        names.update({str(choice).upper(): field for choice in choices if isinstance(choice, str)})
    return names


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """What is wrong with each ``DISPATCHER_*`` variable that names no setting (nor a variable
    of the CLI or the agent), with the closest known name."""
    known = environment_names()
    suffixes = [name.removeprefix(ENV_PREFIX) for name in (*known, *OTHER_VARIABLES) if name.startswith(ENV_PREFIX)]
    problems = []
    for variable in sorted(environ):
        name = variable.upper()
        if not name.startswith(ENV_PREFIX) or name in known or name in OTHER_VARIABLES:
            continue
        rest = name.removeprefix(ENV_PREFIX)
        if rest.lower() in ENVIRONMENT_ONLY:
            close = [ENVIRONMENT_ONLY[rest.lower()]]
        else:
            # Matched without the prefix, which every candidate shares and would make anything look close.
            close = [ENV_PREFIX + match for match in difflib.get_close_matches(rest, suffixes, 1)]
        problems.append(f"unknown environment variable {variable}" + (f"; did you mean {close[0]}?" if close else ""))
    return problems


def load_settings(**overrides: Any) -> Settings:
    """Read the configuration now; raise ConfigError with every problem named."""
    try:
        return Settings(**overrides)
    except SettingsError as exc:
        raise ConfigError(
            f"invalid configuration: {exc} (lists in the environment are JSON arrays: '[\"a\", \"b\"]')") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return load_settings()
