"""The composition root: the parts of the dispatcher one process uses, built in one place.

A process's registry, jobs, fleet and node queues (the outbox) share one Redis
client (the process's pool, ``dispatcher.connection.shared_client``), one
``Keys`` and one ``Scripts``. ``build_core`` is the only place they are put
together: the web process calls it once per app (its script calls batched, for
thousands of sessions), and a Celery process gets its own through
``process_core``, shared by the tasks, the completion loop and the revoke
handler of that process (so one publisher, one job events connection).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from dispatcher.batching import ScriptBatcher
from dispatcher.clock import Clock, now_ms
from dispatcher.connection import shared_client
from dispatcher.delivery import Outbox
from dispatcher.fleet import Fleet
from dispatcher.joblist import JobList
from dispatcher.jobs import Jobs
from dispatcher.jobviews import JobViews
from dispatcher.keys import Keys
from dispatcher.metrics import exposition
from dispatcher.registry import Registry
from dispatcher.scripts import Scripts
from dispatcher.settings import Settings
from dispatcher.store import store_client, unwrapped


@dataclass(frozen=True)
class Core:
    """One process's parts, on one client, one ``Keys`` and one ``Scripts``."""

    settings: Settings
    client: redis.Redis
    keys: Keys
    scripts: Scripts
    registry: Registry
    jobs: Jobs
    fleet: Fleet
    #: The node queues, seen from the process that holds the sessions (the web process).
    outbox: Outbox
    job_list: JobList
    job_views: JobViews

    def ping(self) -> None:
        """Whether the store answers: raises StoreError (naming redis-py's error) when not."""
        self.client.ping()

    def stats(self) -> dict[str, Any]:
        """Dispatch statistics: decisions, exclusions by reason and their examples, waiting jobs."""
        return self.jobs.stats()

    def store_identity(self) -> dict[str, Any]:
        """Which Redis this is (not where, nor how to get in): its run id and database."""
        return {"redis_run_id": self.client.info("server").get("run_id"),
                "redis_db": self.client.connection_pool.connection_kwargs.get("db", 0)}

    def metrics(self) -> bytes:
        """The text of ``/metrics``: the fleet's metrics from Redis, then this process's own."""
        return exposition(self.fleet, self.jobs)


def build_core(settings: Settings, app: Celery, *, batch_scripts: bool = False, clock: Clock = now_ms) -> Core:
    """The parts one process uses, on the process's one client. ``batch_scripts``: script calls
    go to Redis grouped in pipelines (the web process: thousands of sessions' heartbeats, pops
    and acks). Builds no connection: each part opens what it needs from the shared pool."""
    # Every part's commands raise StoreError (dispatcher/store.py); the scripts translate their own.
    client = store_client(shared_client(settings))
    keys = Keys(settings.key_prefix)
    batcher = ScriptBatcher(unwrapped(client)) if batch_scripts else None
    scripts = Scripts(unwrapped(client), keys, batcher)
    jobs = Jobs(client, settings, app, clock, keys=keys, scripts=scripts)
    return Core(settings=settings, client=client, keys=keys, scripts=scripts,
                registry=Registry(client, settings, clock, batcher, keys=keys, scripts=scripts),
                jobs=jobs, fleet=Fleet(client, settings, clock, keys=keys), outbox=Outbox(client, scripts, keys),
                job_list=JobList(client, keys), job_views=JobViews(jobs))


#: (pid, Celery app) -> that process's core.
_process_cores: dict[tuple[int, Celery], Core] = {}
_process_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _process_lock
    _process_lock = threading.Lock()  # a fork while another thread held it would leave it held


os.register_at_fork(after_in_child=_after_fork_in_child)


def process_core(settings: Settings, app: Celery) -> Core:
    """The core of this Celery process, built on first use: after a prefork pool process forks,
    each builds its own; in a worker's main process, the completion loop and the revoke handler
    share one (one ``Jobs``: one publisher, one job events connection)."""
    key = (os.getpid(), app)
    with _process_lock:
        core = _process_cores.get(key)
        if core is None or (core.settings is not settings and core.settings != settings):
            core = _process_cores[key] = build_core(settings, app)
        return core
