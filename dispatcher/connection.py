"""Redis clients for the dispatcher's own records (Celery keeps its own)."""

from __future__ import annotations

import os
from typing import Any

import redis

from dispatcher.settings import Settings


def redis_options(settings: Settings) -> dict[str, Any]:
    """Connection options shared by every client, TLS included."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_keepalive": True,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        "client_name": f"dispatcher-{os.getpid()}",
    }
    if settings.redis_url.startswith("rediss://"):
        # Heroku's Redis presents a self-signed certificate; verify only on request.
        options["ssl_cert_reqs"] = "required" if settings.redis_tls_verify else "none"
    return options


def redis_client(settings: Settings, max_connections: int | None = None) -> redis.Redis:
    """A client whose pool waits for a free connection instead of failing past its size."""
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections or settings.redis_max_connections,
        timeout=10,
        socket_timeout=15,
        **redis_options(settings),
    )
    return redis.Redis(connection_pool=pool)


def pubsub_client(settings: Settings) -> redis.Redis:
    """A client for one long-lived subscription: no read timeout, one connection."""
    return redis.Redis.from_url(settings.redis_url, max_connections=2, **redis_options(settings))
