"""Redis clients for the dispatcher's own records (Celery keeps its own), and the check
every process makes at start that Redis answers."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import redis

from dispatcher.logs import log_event
from dispatcher.settings import Settings

log = logging.getLogger("dispatcher.connection")

#: (pid, URL, pool size) -> the client every part of that process shares.
_shared: dict[tuple[int, str, int], redis.Redis] = {}
_shared_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()  # a fork while another thread held it would leave it held


os.register_at_fork(after_in_child=_after_fork_in_child)


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


def shared_client(settings: Settings) -> redis.Redis:
    """The process's one client for the dispatcher's records: every part of a process (the
    tasks, the completions thread, the revoke handler, the tally) shares its pool of
    ``redis_max_connections``, which counts towards the Redis connection budget
    (docs/operations.md). A forked pool process makes its own."""
    key = (os.getpid(), settings.redis_url, settings.redis_max_connections)
    with _shared_lock:
        client = _shared.get(key)
        if client is None:
            client = _shared[key] = redis_client(settings)
        return client


def pubsub_client(settings: Settings) -> redis.Redis:
    """A client for one long-lived subscription: no read timeout, one connection."""
    return redis.Redis.from_url(settings.redis_url, max_connections=2, **redis_options(settings))


def say_if_unreachable(settings: Settings, process: str) -> bool:
    """Ping Redis once; when it does not answer, log one line that names REDIS_URL and what
    it is set to (the process then keeps retrying on its own, as after a Redis restart).
    Returns whether Redis answered."""
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3,
                                  **{k: v for k, v in redis_options(settings).items()
                                     if k not in ("socket_connect_timeout", "health_check_interval")})
    try:
        client.ping()
        return True
    except redis.RedisError as exc:
        named = "REDIS_URL" in os.environ or "DISPATCHER_REDIS_URL" in os.environ
        log_event(log, "redis_unreachable", logging.ERROR, process_type=process, redis_url=_without_password(
            settings.redis_url), error=str(exc)[:300],
            hint=("REDIS_URL names a Redis that does not answer: check it (and that Redis runs)" if named else
                  "REDIS_URL is not set, so the default (a Redis on this machine, port 6379) is used: "
                  "set REDIS_URL to your Redis (./scripts/up starts one for you)") + "; retrying meanwhile")
        return False
    finally:
        client.close()


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in credentials else url
