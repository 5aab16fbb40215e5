"""Test fixtures: a private redis-server for the session, real processes per need.

pytest-celery's plugin is disabled in pyproject (``-p no:celery``): it wants a
Docker engine. Celery workers and beat run here as real child processes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from dispatcher.keys import Keys
from dispatcher.localredis import LocalRedis
from dispatcher.registry import Registry
from dispatcher.settings import Settings, load_settings
from tests.support import NodeClient, RawSocket, WebServer

#: Settings every test process starts from (unless a test says otherwise).
BASE_SETTINGS: dict[str, Any] = {"require_gpu": False, "resource_threshold_percent": 90}


@pytest.fixture(autouse=True)
def _close_raw_sockets() -> Iterator[None]:
    yield
    RawSocket.close_all()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    server = LocalRedis(tmp_path_factory.mktemp("redis"), append_only=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: LocalRedis) -> str:
    return redis_server.url


def forget_everything(client: redis.Redis) -> None:
    """Delete the dispatcher's keys and Celery's results, but not kombu's
    bindings and queues: a running worker would stop hearing its queues."""
    for pattern in ("{*", "celery-task-meta-*"):  # every key prefix the tests use starts with "{"
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start:start + 1000])


#: The session's shared web + worker + beat run on this database; its beat scans
#: every half second, so tests that drive the status machine with an injected
#: clock (db 0) must never share a database with it.
SYSTEM_DB = 1


@pytest.fixture(scope="session")
def system_url(redis_server: LocalRedis) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/{SYSTEM_DB}"


@pytest.fixture
def db_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The database a test works on: the shared system's when it uses the
    system, else db 0, where no beat runs."""
    return request.getfixturevalue("system_url") if "system" in request.fixturenames else redis_url


@pytest.fixture
def r(db_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(db_url, decode_responses=True)
    forget_everything(client)
    yield client
    forget_everything(client)
    client.close()


_spare_dbs = itertools.cycle(range(SYSTEM_DB + 1, 16))


@pytest.fixture
def own_redis(redis_server: LocalRedis) -> Iterator[tuple[str, redis.Redis]]:
    """A Redis database of its own (neither db 0 nor the shared system's), for a test that starts its own web, worker and beat processes."""
    url = f"redis://127.0.0.1:{redis_server.port}/{next(_spare_dbs)}"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    yield url, client
    client.flushdb()
    client.close()


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
def make_settings(db_url: str) -> Any:
    def make(**overrides: Any) -> Settings:
        return load_settings(**{"redis_url": db_url, **BASE_SETTINGS, **overrides})
    return make


@pytest.fixture
def settings(make_settings: Any) -> Settings:
    return make_settings()


@pytest.fixture
def registry(r: redis.Redis, settings: Settings) -> Registry:
    return Registry(r, settings)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def web(redis_url: str, logs_dir: Path) -> Iterator[WebServer]:
    """One gevent gunicorn for the session, with the tests' base settings."""
    server = WebServer(redis_url, logs_dir, **BASE_SETTINGS, required_models=["whisper"],
                       status_report_interval_seconds=0.5, delivery_sweep_interval_seconds=0.2).start()
    yield server
    server.stop()


@pytest.fixture
def start_web(db_url: str, logs_dir: Path) -> Iterator[Any]:
    """Start extra web servers with their own settings; all stopped after the test."""
    started: list[WebServer] = []

    def start(**settings: Any) -> WebServer:
        server = WebServer(db_url, logs_dir, **{**BASE_SETTINGS, **settings}).start()
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()


@pytest.fixture
def nodes(r: redis.Redis) -> Iterator[Any]:
    """Open node sessions against a server; all closed after the test."""
    opened: list[NodeClient] = []

    def open_session(server: WebServer) -> NodeClient:
        client = NodeClient(server.ws_url)
        opened.append(client)
        return client
    yield open_session
    for client in opened:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - the server may have closed it already
            pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On failure, attach the tail of every child process's log."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for name in ("web", "start_web"):
            server = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if isinstance(server, WebServer) and server.process is not None:
                report.sections.append((f"{name} log", server.process.log()[-4000:]))


class System:
    """web + worker + beat from the Procfile, sharing one Redis and one set of settings."""

    def __init__(self, redis_url: str, logs_dir: Path, **settings: Any) -> None:
        from tests.support import clean_env, start_procfile

        merged = {**BASE_SETTINGS, "periodic_scan_interval_seconds": 0.5, "heartbeat_timeout_seconds": 3,
                  "heartbeat_interval_seconds": 0.3,
                  "status_report_interval_seconds": 60, "delivery_sweep_interval_seconds": 0.5, **settings}
        self.settings = merged
        metrics_dir = logs_dir / f"metrics-{id(self)}"
        metrics_dir.mkdir()
        shared = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        self.web = WebServer(redis_url, logs_dir, **merged, **shared).start()
        env = clean_env(redis_url, **merged, **shared)
        self.worker = start_procfile("worker", {**env, "WORKER_CONCURRENCY": "2"}, logs_dir)
        self.beat = start_procfile("beat", env, logs_dir)
        self.redis_url = redis_url
        self._wait_for_worker()

    def _wait_for_worker(self) -> None:
        from tests.support import wait_for

        wait_for(lambda: "ready." in self.worker.log() or not self.worker.alive(), 30, 0.1, what="worker ready")
        assert self.worker.alive(), self.worker.log()[-3000:]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in (self.worker, self.beat))

    def stop(self) -> None:
        for process in (self.beat, self.worker):
            process.stop()
        self.web.stop()


def client_app(redis_url: str) -> Any:
    """A client as the contract writes it: nothing of the project, only celery."""
    from celery import Celery

    return Celery(broker=redis_url, backend=redis_url)


@pytest.fixture(scope="session")
def system(system_url: str, logs_dir: Path) -> Iterator[System]:
    running = System(system_url, logs_dir)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(system_url: str) -> Any:
    return client_app(system_url)


@pytest.fixture
def live_nodes(r: redis.Redis) -> Iterator[Any]:
    from tests.support import LiveNode

    opened: list[LiveNode] = []

    def open_node(server: WebServer, models: dict[str, str] | None = None, **fields: Any) -> LiveNode:
        node = LiveNode(server.ws_url, models, **fields)
        opened.append(node)
        return node
    yield open_node
    for node in opened:
        try:
            node.close()
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture
def agents(db_url: str, logs_dir: Path) -> Iterator[Any]:
    """Start reference node agents (real processes); all killed after the test."""
    from tests.support import PYTHON, Process, clean_env

    started: list[Process] = []

    def start(server: WebServer | str, state: Path, *extra: str) -> Process:
        url = server if isinstance(server, str) else server.ws_url
        args = [PYTHON, "-m", "dispatcher.agent", "--url", url, "--state-file", str(state),
                "--model", "whisper", *extra]
        process = Process("agent", args, clean_env(db_url), logs_dir, cwd=logs_dir)
        started.append(process)
        return process
    yield start
    for process in started:
        process.kill()
