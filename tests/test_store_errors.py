"""A Redis that fails reaches the web process as the core's ``StoreError``, never as a
redis-py exception: every call the web process makes into the core (sessions, the API,
the page, the hub's ticker) raises ``StoreUnavailable`` when Redis cannot be reached,
with redis-py's error as its ``__cause__`` (dispatcher/store.py)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dispatcher.batching import ScriptBatcher
from dispatcher.delivery import Outbox
from dispatcher.errors import StoreError, StoreUnavailable
from dispatcher.filter import JobNeeds
from dispatcher.fleet import Fleet
from dispatcher.joblist import JobList
from dispatcher.jobs import Jobs
from dispatcher.jobviews import JobViews
from dispatcher.localrun.redis_server import LocalRedis
from dispatcher.messages import JobAck, JobResult, NodeDrain, NodeHeartbeat, NodeRegister, decode_node_message
from dispatcher.metrics import exposition
from dispatcher.registry import Registry, SessionNode
from dispatcher.settings import Settings
from tests.conftest import client_app

T0 = 1_800_000_000_000


def closed_port() -> int:
    """A local port nothing listens on (bound a moment ago, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def without_retries(url: str) -> redis.Redis:
    """A client that fails at once: redis-py retries a refused connection three times by default."""
    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2, socket_timeout=2,
                                retry=Retry(NoBackoff(), 0))


@pytest.fixture
def dead_url() -> str:
    return f"redis://127.0.0.1:{closed_port()}/0"


@pytest.fixture
def dead(dead_url: str) -> Iterator[redis.Redis]:
    client = without_retries(dead_url)
    yield client
    client.close()


def register_msg(node_id: str = "gpu-1") -> NodeRegister:
    return NodeRegister.model_validate_json(json.dumps({"type": "node_register", "node_id": node_id}))


def frame(**fields: Any) -> Any:
    return decode_node_message(json.dumps(fields))


def web_calls(registry: Registry, jobs: Jobs, settings: Settings) -> dict[str, Callable[[], Any]]:
    """Every kind of call the web process makes into the core, by what makes it."""
    node = SessionNode("gpu-1", "s-1", {}, 0, False)
    fleet = Fleet(registry.client, settings, registry.clock)
    outbox = Outbox(registry.client, registry.scripts, registry.keys)
    beat = NodeHeartbeat.model_validate_json(json.dumps({
        "type": "node_heartbeat", "resource_usage": {"cpu_percent": 5, "mem_percent": 5, "running_jobs": 0}}))
    ack = frame(type="job_ack", job_id="j-1", attempt=1)
    result = frame(type="job_result", job_id="j-1", attempt=1, success=True, output={})
    assert isinstance(ack, JobAck) and isinstance(result, JobResult)
    drain = frame(type="node_drain", reason="maintenance")
    assert isinstance(drain, NodeDrain)
    return {
        # a node's session (web/session.py)
        "register": lambda: registry.register(register_msg(), "s-1", "w"),
        "heartbeat": lambda: registry.heartbeat(node, beat),
        "ack": lambda: jobs.ack("gpu-1", ack),
        "result, kind unknown": lambda: jobs.report_result("gpu-1", result),
        "result, kind known": lambda: jobs.report_result("gpu-1", result, "kind"),
        "drain from the node": lambda: registry.drain("gpu-1", "node gpu-1", drain.reason),
        "kick": jobs.request_kick,
        "pop": lambda: outbox.pop("gpu-1", "s-1", 1000),
        "close": lambda: registry.close_session("gpu-1", "s-1"),
        # the hub's ticker (web/hub.py)
        "sweep": lambda: outbox.pending(["gpu-1"]),
        "status reports": lambda: fleet.status_reports(["gpu-1"]),
        # the API and the page (web/api.py, web/page.py)
        "readyz": registry.client.ping,
        "info": lambda: registry.client.info("server"),
        "nodes": lambda: fleet.page(None, 10, None),
        "nodes of a status": lambda: fleet.page("ready", 10, None),
        "node views": lambda: list(fleet.views_in_chunks(["gpu-1"])),
        "counts": fleet.counts_by_status,
        "node": lambda: fleet.node("gpu-1"),
        "undrain": lambda: registry.undrain("gpu-1", "operator"),
        "cordon": lambda: registry.cordon("gpu-1", "operator", "maintenance"),
        "uncordon": lambda: registry.uncordon("gpu-1", "operator"),
        "forget": lambda: registry.forget("gpu-1", "operator"),
        "needs of a job": lambda: jobs.needs_of("j-1"),
        "eligibility": lambda: JobViews(jobs).eligibility("gpu-1", JobNeeds((), False, False, ())),
        "job": lambda: JobViews(jobs).view("j-1"),
        "jobs": lambda: JobList(jobs.client, jobs.keys).page(None, None, 10, None),
        "jobs of a node": lambda: JobList(jobs.client, jobs.keys).page(None, "gpu-1", 10, None),
        "stats": jobs.dispatcher.stats,
        "scan state": fleet.last_scan,
        "transitions": lambda: fleet.recent_transitions(10),
        "metrics": lambda: exposition(fleet, jobs),
        # the workers' (a cancel through Celery's revoke)
        "cancel": lambda: jobs.cancel("j-1"),
    }


def raised(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - what it raised is the subject
        return exc
    return None


def assert_unavailable(calls: dict[str, Callable[[], Any]]) -> None:
    wrong = {}
    for name, call in calls.items():
        exc = raised(call)
        if not (isinstance(exc, StoreUnavailable) and isinstance(exc.__cause__, redis.ConnectionError)
                and not isinstance(exc, redis.RedisError)):
            wrong[name] = repr(exc)
    assert wrong == {}, "calls that did not raise StoreUnavailable from redis.ConnectionError"


def test_every_call_the_web_process_makes_raises_store_unavailable_when_redis_is_down(
        dead: redis.Redis, dead_url: str, make_settings: Any) -> None:
    settings = make_settings(redis_url=dead_url)
    registry = Registry(dead, settings, clock=lambda: T0)
    jobs = Jobs(dead, settings, client_app(dead_url), clock=lambda: T0)
    assert_unavailable(web_calls(registry, jobs, settings))


def test_the_web_process_batched_script_calls_raise_store_unavailable_too(
        dead: redis.Redis, dead_url: str, make_settings: Any) -> None:
    """web/app.py sends the sessions' script calls through a ScriptBatcher on its own client."""
    settings = make_settings(redis_url=dead_url)
    registry = Registry(dead, settings, clock=lambda: T0, batcher=ScriptBatcher(dead))
    node = SessionNode("gpu-1", "s-1", {}, 0, False)
    beat = NodeHeartbeat.model_validate_json(json.dumps({
        "type": "node_heartbeat", "resource_usage": {"cpu_percent": 5, "mem_percent": 5, "running_jobs": 0}}))
    assert_unavailable({
        "register": lambda: registry.register(register_msg(), "s-1", "w"),
        "heartbeat": lambda: registry.heartbeat(node, beat),
        "close": lambda: registry.close_session("gpu-1", "s-1"),
        "pop": lambda: Outbox(registry.client, registry.scripts, registry.keys).pop("gpu-1", "s-1", 1000),
    })


def test_a_timeout_is_store_unavailable(r: redis.Redis, db_url: str, make_settings: Any) -> None:
    """A Redis that stops answering mid-call (a fault injected in the connection)."""
    client = without_retries(db_url)
    registry = Registry(client, make_settings(), clock=lambda: T0)
    registry.client.ping()  # a connection in the pool, which then times out
    with mock.patch.object(redis.connection.Connection, "read_response",
                           side_effect=redis.TimeoutError("Timeout reading from socket")):
        for call in (lambda: registry.close_session("gpu-1", "s-1"), lambda: registry.forget("gpu-1", "operator"),
                     lambda: Fleet(registry.client, registry.settings).page(None, 10, None)):
            with pytest.raises(StoreUnavailable, match="Timeout reading") as caught:
                call()
            assert isinstance(caught.value.__cause__, redis.TimeoutError)
    client.close()


def test_a_command_redis_refuses_is_a_store_error_that_says_why(registry: Registry, r: redis.Redis) -> None:
    with pytest.raises(StoreError, match="WRONGTYPE") as caught:  # (not StoreUnavailable: trying again won't do)
        r.set(registry.keys.nodes(), "not a sorted set")
        Fleet(registry.client, registry.settings).page(None, 10, None)
    assert type(caught.value) is StoreError and isinstance(caught.value.__cause__, redis.ResponseError)
    with pytest.raises(StoreError, match="invalid node id") as caught:  # a script refusing
        registry.close_session("not/a/node", "s-1")
    # (a ScriptError: a StoreError that names the script)
    assert not isinstance(caught.value, StoreUnavailable) and isinstance(caught.value.__cause__, redis.ResponseError)


@pytest.fixture
def lone_redis(tmp_path: Any) -> Iterator[LocalRedis]:
    """A redis-server of its own: these tests make it refuse writes."""
    server = LocalRedis(tmp_path / "redis", append_only=False).start()
    yield server
    server.stop()


def test_what_redis_refuses_for_the_moment_is_store_unavailable(lone_redis: LocalRedis, make_settings: Any) -> None:
    """A replica during a failover refuses writes (READONLY), a full Redis refuses them too
    (OOM): a script call and a plain command each raise StoreUnavailable, which the API
    answers 503 and clients retry, not a StoreError that says the request itself is wrong."""
    client = without_retries(lone_redis.url)
    registry = Registry(client, make_settings(redis_url=lone_redis.url), clock=lambda: T0)
    registry.register(register_msg(), "s-1", "w")
    admin = redis.Redis(port=lone_redis.port)
    calls: dict[str, Callable[[], Any]] = {
        "a script": lambda: registry.close_session("gpu-1", "s-1"),
        "a command": lambda: registry.client.set(registry.keys.kick(), 1),
    }
    try:
        admin.config_set("maxmemory", 1)
        for name, call in calls.items():
            exc = raised(call)
            assert isinstance(exc, StoreUnavailable) and "OOM" in str(exc), (name, repr(exc))
        admin.config_set("maxmemory", 0)
        admin.replicaof("127.0.0.1", closed_port())  # a replica of a master it cannot reach: read-only
        for name, call in calls.items():
            exc = raised(call)
            assert isinstance(exc, StoreUnavailable) and "READONLY" in str(exc), (name, repr(exc))
        admin.replicaof("NO", "ONE")
        assert registry.close_session("gpu-1", "s-1") is not None, "the same call works once Redis takes writes"
    finally:
        admin.close()
        client.close()
