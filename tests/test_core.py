"""One composition root (dispatcher/core.py): the web app and the Celery side of a process get
their parts from the one builder, on one client, and the web answers a store failure alike
whichever error reports it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from flask import Flask

import dispatcher.completions
import dispatcher.core
import web.app
from dispatcher.core import Core
from dispatcher.errors import StoreError, StoreUnavailable
from dispatcher.settings import Settings, get_settings
from web.api import CORE, HUB


@pytest.fixture
def make_app() -> Iterator[Any]:
    """``create_app`` in this process; it gives the process's logging to its JSON handler,
    which pytest's capture must get back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def make(settings: Settings) -> Flask:
        return web.app.create_app(settings)
    yield make
    root.handlers[:] = handlers
    root.setLevel(level)


def test_the_web_app_and_the_celery_side_get_their_parts_from_the_one_builder(
        celery_session_app: Celery, make_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from dispatcher import revoke, tasks
    from dispatcher.completions import CompletionStep

    built: list[Core] = []
    build = dispatcher.core.build_core

    def recorded(*args: Any, **kwargs: Any) -> Core:
        built.append(build(*args, **kwargs))
        return built[-1]
    monkeypatch.setattr(dispatcher.core, "build_core", recorded)
    monkeypatch.setattr(web.app, "build_core", recorded)
    monkeypatch.setattr(dispatcher.core, "_process_cores", {})  # this process's Celery core, built anew

    app = make_app(get_settings())
    web_core, hub = app.extensions[CORE], app.extensions[HUB]
    task_core = tasks.core()
    assert len(built) == 2 and built[0] is web_core and built[1] is task_core
    assert web_core.client.connection_pool is task_core.client.connection_pool, "one pool of connections per process"
    for core in (web_core, task_core):
        parts = (core.registry, core.jobs, core.fleet, core.outbox)
        assert all(part.client is core.client for part in parts)
        assert all(part.keys is core.keys for part in parts)
        assert core.registry.scripts is core.jobs.scripts is core.outbox.scripts is core.scripts
        assert core.job_list.client is core.client and core.job_views.jobs is core.jobs
    assert (hub.registry, hub.jobs, hub.fleet, hub.outbox) == (web_core.registry, web_core.jobs, web_core.fleet,
                                                               web_core.outbox)
    # The web process's script calls go in pipelines (thousands of sessions); a worker's one by one.
    assert web_core.scripts._batcher is not None and task_core.scripts._batcher is None

    # The tasks, the revoke handler and the completion loop of a process share its core's jobs.
    started: list[Any] = []

    class Recorded:
        def __init__(self, jobs: Any, consumer: str) -> None:
            started.append(jobs)

        def run(self, stop: Any) -> None:
            stop.wait()
    monkeypatch.setattr(dispatcher.completions, "Completions", Recorded)
    worker = SimpleNamespace(app=celery_session_app, hostname="core@tests")
    step = CompletionStep(worker)
    step.start(worker)
    step.stop(worker)
    assert started == [task_core.jobs]
    assert started[0] is tasks.jobs() is revoke._jobs(), "one Jobs: one publisher, one events connection"
    assert tasks.registry() is task_core.registry and len(built) == 2


def test_the_web_answers_503_while_the_store_is_out_of_reach_and_500_when_it_refuses(
        make_app: Any, make_settings: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A 503 is retried by clients and routers: it says Redis is out of reach. A command Redis
    refuses (WRONGTYPE, a script's error) fails the same way every time: a 500, logged."""
    unreachable = make_app(make_settings(redis_url="redis://127.0.0.1:1/0")).test_client()
    ready = unreachable.get("/readyz")
    assert ready.status_code == 503 and ready.json is not None
    assert ready.json["status"] == "unavailable" and ready.json["error"].startswith("redis: ")
    stats = unreachable.get("/api/stats")
    assert stats.status_code == 503 and stats.json is not None
    assert stats.json["error"].startswith("the dispatcher's store is unavailable: ")
    page = unreachable.get("/")
    assert page.status_code == 503 and page.text.startswith("The dispatcher's store is unavailable: ")
    assert unreachable.get("/healthz").status_code == 200, "the process itself is alive"

    app = make_app(make_settings())
    core: Core = app.extensions[CORE]

    def fails(error: StoreError) -> Any:
        def raising(*_args: Any, **_kwargs: Any) -> Any:
            raise error
        return raising
    client = app.test_client()
    monkeypatch.setattr(core.jobs, "stats", fails(StoreUnavailable("what the core says of it")))
    stats = client.get("/api/stats")
    assert (stats.status_code, stats.json) == (503, {"error": "the dispatcher's store is unavailable: "
                                                              "what the core says of it"})
    assert stats.headers["Cache-Control"] == "no-store"
    live = client.get("/live")
    assert (live.status_code, live.text) == (503, "The dispatcher's store is unavailable: what the core says of it\n")

    monkeypatch.setattr(core.jobs, "stats", fails(StoreError("WRONGTYPE Operation against a key")))
    capsys.readouterr()
    stats = client.get("/api/stats")
    assert (stats.status_code, stats.json) == (500, {"error": "the dispatcher's store refused the request: "
                                                              "WRONGTYPE Operation against a key"})
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(e["event"], e["level"], e["path"]) for e in logged] == [("store_failed", "ERROR", "/api/stats")]
    assert "WRONGTYPE" in logged[0]["exc_info"], "with its traceback"
    live = client.get("/live")
    assert (live.status_code, live.text) == (500, "The dispatcher's store refused the request: "
                                                  "WRONGTYPE Operation against a key\n")
    assert client.get("/readyz").json == {"status": "ok"}
