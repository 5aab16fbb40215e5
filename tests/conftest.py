"""Test fixtures: a private redis-server for the session, real processes per need.

pytest-celery's plugin is disabled in pyproject (``-p no:celery``): it wants a
Docker engine. The task layer's fast tests run the project's real app in this
process instead, in Celery's embedded worker, on a database of their own; the
system's workers and beat run as real child processes. docs/testing.md tells how
the suite is organised.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.worker import WorkController

from dispatcher.keys import Keys
from dispatcher.localrun.redis_server import LocalRedis, free_port
from dispatcher.registry import Registry
from dispatcher.settings import Settings, get_settings, load_settings
from tests.support import (
    PYTHON,
    LiveNode,
    NodeClient,
    Process,
    RawSocket,
    WebServer,
    clean_env,
    client_app,
    forget_everything,
    start_procfile,
    wait_for,
)

#: Settings every test process starts from (unless a test says otherwise).
BASE_SETTINGS: dict[str, Any] = {"require_gpu": False, "resource_threshold_percent": 90}


#: Fixtures that start processes (gunicorn, Celery workers, beat, agents) or serve tests
#: that start their own: a test that asks for one is ``slow``, out of the fast loop.
PROCESS_FIXTURES = frozenset({"system", "web", "start_web", "agents", "own_redis", "logs_dir", "browser", "flower"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


#: The test running now when it is not marked slow (None between tests and for slow ones).
_fast_test: str | None = None


def _refuse_processes_in_fast_tests(event: str, args: tuple[Any, ...]) -> None:
    """The fast loop (``-m "not slow"``) stays fast only if its tests start no process but
    a redis-server: one that does fails here, named, rather than slow the loop down unseen."""
    if event != "subprocess.Popen" or _fast_test is None:
        return
    program = Path(os.fsdecode(args[0])).name  # Popen resolves the executable before it audits
    if program != "redis-server":
        raise RuntimeError(f"{_fast_test} starts {program}: mark it @pytest.mark.slow")


sys.addaudithook(_refuse_processes_in_fast_tests)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    global _fast_test
    _fast_test = None if item.get_closest_marker("slow") else item.nodeid
    try:
        return (yield)
    finally:
        _fast_test = None


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


#: The session's shared web + worker + beat run on this database; its beat scans
#: every half second, so tests that drive the status machine with an injected
#: clock (db 0) must never share a database with it.
SYSTEM_DB = 1


@pytest.fixture(scope="session")
def system_url(redis_server: LocalRedis) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/{SYSTEM_DB}"


#: The in-process Celery worker's database (the task layer's tests): no other worker
#: may read its queues or its results stream.
TASKS_DB = 15


@pytest.fixture(scope="session")
def tasks_url(redis_server: LocalRedis) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/{TASKS_DB}"


@pytest.fixture
def db_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The database a test works on: the shared system's when it uses the
    system, the in-process worker's when it uses that, else db 0, where no beat runs."""
    if "system" in request.fixturenames:
        return str(request.getfixturevalue("system_url"))
    if "celery_session_worker" in request.fixturenames:
        return str(request.getfixturevalue("tasks_url"))
    return redis_url


@pytest.fixture
def r(db_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(db_url, decode_responses=True)
    forget_everything(client)
    yield client
    forget_everything(client)
    client.close()


_spare_dbs = itertools.cycle(range(SYSTEM_DB + 1, TASKS_DB))


@pytest.fixture
def own_redis(redis_server: LocalRedis) -> Iterator[tuple[str, redis.Redis]]:
    """A Redis database of its own (neither db 0 nor the shared system's), for a test that starts
    its own web, worker and beat processes."""
    url = f"redis://127.0.0.1:{redis_server.port}/{next(_spare_dbs)}"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    yield url, client
    client.flushdb()
    client.close()


# The two fixtures below keep the names of celery.contrib.pytest's, whose plugin is not
# loaded: its app is a bare TestApp, and its worker would leave the app's JSON logging
# in charge of pytest's.


@pytest.fixture(scope="session")
def celery_session_app(tasks_url: str) -> Iterator[Celery]:
    """The project's real app: its queues, routes, tasks and the completion bootstep,
    configured as every process is, from the settings, here read once from an
    environment naming the tasks' database."""
    import celery.contrib.testing.tasks  # noqa: F401 - registers celery.ping, the embedded worker's ready check

    env = {k: v for k, v in clean_env(tasks_url, **BASE_SETTINGS).items() if k.startswith("DISPATCHER_")}
    with pytest.MonkeyPatch.context() as patch:
        for name in os.environ:
            if name.upper().startswith("DISPATCHER_") or name in ("REDIS_URL", "PORT"):
                patch.delenv(name)
        for name, value in {**env, "REDIS_URL": tasks_url}.items():
            patch.setenv(name, value)
        get_settings.cache_clear()
        from dispatcher.celery_app import app

        # celeryconfig reads the settings when the app's configuration is first read: now.
        assert app.conf.broker_url == tasks_url, "the app was configured before this fixture ran"
        assert get_settings().redis_url == tasks_url
    yield app
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def celery_session_worker(celery_session_app: Celery) -> Iterator[WorkController]:
    """Celery's embedded worker (a thread, solo pool) running the real app for the session."""
    from celery.contrib.testing.worker import start_worker

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with start_worker(celery_session_app, pool="solo") as worker:
        # Starting it ran the app's setup_logging receiver, which gives the process's logging
        # to one JSON handler on stdout: pytest's capture and reports must keep theirs.
        root.handlers[:] = handlers
        root.setLevel(level)
        yield worker


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
def make_settings(db_url: str) -> Any:
    def make(**overrides: Any) -> Settings:
        return load_settings(**{"redis_url": db_url, **BASE_SETTINGS, **overrides})
    return make


@pytest.fixture
def plain_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Settings from the defaults and the overrides given, whatever this process's environment
    and working folder hold (no Redis: for the unit tests of pure functions)."""
    for name in list(os.environ):
        if name.upper().startswith("DISPATCHER_") or name in ("REDIS_URL", "PORT"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return load_settings


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
        with contextlib.suppress(Exception):  # the server may have closed it already
            client.close()


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
        merged = {**BASE_SETTINGS, "periodic_scan_interval_seconds": 0.5, "heartbeat_timeout_seconds": 3,
                  "heartbeat_interval_seconds": 0.3,
                  "status_report_interval_seconds": 60, "delivery_sweep_interval_seconds": 0.5, **settings}
        self.settings = merged
        self.web = WebServer(redis_url, logs_dir, **merged).start()
        env = clean_env(redis_url, **merged)
        self.worker = start_procfile("worker", {**env, "WORKER_CONCURRENCY": "2"}, logs_dir)
        self.beat = start_procfile("beat", env, logs_dir)
        self.redis_url = redis_url
        self._wait_for_worker()

    def _wait_for_worker(self) -> None:
        wait_for(lambda: "ready." in self.worker.log() or not self.worker.alive(), 30, 0.1, what="worker ready")
        assert self.worker.alive(), self.worker.log()[-3000:]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in (self.worker, self.beat))

    def stop(self) -> None:
        for process in (self.beat, self.worker):
            process.stop()
        self.web.stop()


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
    opened: list[LiveNode] = []

    def open_node(server: WebServer, models: dict[str, str] | None = None, **fields: Any) -> LiveNode:
        node = LiveNode(server.ws_url, models, **fields)
        opened.append(node)
        return node
    yield open_node
    for node in opened:
        with contextlib.suppress(Exception):  # the server may have closed it already
            node.close()


@pytest.fixture
def agents(db_url: str, logs_dir: Path) -> Iterator[Any]:
    """Start reference node agents (real processes); all killed after the test."""
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


class Flower:
    """The Procfile's flower process on the shared system, its API open."""

    def __init__(self, system: System, logs_dir: Path) -> None:
        self.port = free_port()
        env = clean_env(system.redis_url, **system.settings, FLOWER_PORT=self.port, FLOWER_UNAUTHENTICATED_API="true")
        self.process = start_procfile("flower", env, logs_dir)
        try:
            wait_for(lambda: self.call("/api/workers?refresh=1"), 30, 0.3, what="flower up, seeing the worker")
            # ... and hearing the workers' events (their heartbeats): until its event receiver runs,
            # Flower misses what a test does, e.g. a task's received event and with it the name.
            wait_for(lambda: (self.call("/workers?json=1") or {}).get("data"), 30, 0.3,
                     what="flower receiving the workers' events")
        except BaseException:
            self.process.stop()  # no orphan Flower when setting up fails
            raise

    def call(self, path: str, method: str = "GET") -> Any:
        """Flower's JSON answer, or None (not up yet, or 404)."""
        import json
        import urllib.request

        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                         data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def task_in_state(self, task_id: str, state: str) -> dict[str, Any]:
        """Flower's view of a task, once it shows ``state``."""
        return wait_for(lambda: (t := self.call(f"/api/task/info/{task_id}")) and t.get("state") == state and t,
                        20, 0.3, what=f"flower shows {task_id} {state}")


@pytest.fixture
def flower(system: System, logs_dir: Path) -> Iterator[Flower]:
    running = Flower(system, logs_dir)
    yield running
    running.process.stop()
