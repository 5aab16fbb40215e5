"""The worker comes through Redis restarts while it holds unacknowledged messages.

Without dispatcher.brokerfix, kombu 5.7.0's Redis transport ends the worker
("Unrecoverable error: AttributeError ... 'hostname'") when Redis dies while
the worker's BRPOP is outstanding and it holds unacked messages: it tries to
restore them through a connection it has already closed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from dispatcher.localrun.redis_server import LocalRedis
from tests.support import Process, clean_env, start_procfile, unacked_ids, wait_for

RESTARTS = 5
#: Tasks the worker holds unacknowledged at each restart.
IN_FLIGHT = 4


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalRedis]:
    server = LocalRedis(tmp_path / "redis", append_only=True, appendfsync="always").start()
    yield server
    server.stop()


def restart(server: LocalRedis) -> LocalRedis:
    """SIGKILL, as a crash would, and start again on the same port with the same data."""
    server.kill()
    return LocalRedis(server.data_dir, port=server.port, append_only=True, appendfsync="always").start()


def hold_tasks(app: Celery, client: redis.Redis) -> set[str]:
    """Tasks due in an hour: the worker holds them unacked (acks_late) and, its
    prefetch not used up, keeps a BRPOP outstanding for more: the failing path."""
    sent = {app.send_task("dispatcher.scan_nodes", countdown=3600).id for _ in range(IN_FLIGHT)}
    wait_for(lambda: sent <= unacked_ids(client), 20, 0.05, what="tasks held by the worker")
    wait_for(lambda: blocked_in_brpop(client), 20, 0.05, what="the worker back in its BRPOP")
    return sent


def blocked_in_brpop(client: redis.Redis) -> bool:
    """A connection of the worker is blocked in a BRPOP (Redis's own list of its clients says so)."""
    return any(c.get("cmd") == "brpop" and "b" in c.get("flags", "") for c in client.client_list())


def last_words(worker: Process) -> str:
    """Its critical log lines (the "Unrecoverable error"), else the end of its log."""
    lines = worker.log().splitlines()
    critical = [line[:2000] for line in lines if '"level": "CRITICAL"' in line]
    return "\n".join(critical or lines[-30:])


def completes_a_task(app: Celery, client: redis.Redis, worker: Process) -> None:
    # The result is read from Redis: a client's result subscription would outlive a failed test.
    key = f"celery-task-meta-{app.send_task('dispatcher.scan_nodes', ignore_result=False).id}"
    wait_for(lambda: not worker.alive() or client.exists(key), 30, 0.1, what="a new task to complete")
    assert worker.alive(), f"the worker exited:\n{last_words(worker)}"
    raw = client.get(key)
    assert raw is not None
    meta = json.loads(raw)
    assert meta["status"] == "SUCCESS" and "nodes" in meta["result"], meta


@pytest.mark.slow
def test_worker_survives_redis_restarts_with_unacked_messages(broker: LocalRedis, logs_dir: Path) -> None:
    server = broker
    worker = start_procfile("worker", {**clean_env(server.url), "WORKER_CONCURRENCY": "2"}, logs_dir)
    app = Celery(broker=server.url)
    client = redis.Redis(port=server.port)
    held: set[str] = set()
    try:
        wait_for(lambda: "ready." in worker.log() or not worker.alive(), 30, 0.1, what="worker ready")
        completes_a_task(app, client, worker)
        for _ in range(RESTARTS):
            held |= hold_tasks(app, client)
            server = restart(server)
            completes_a_task(app, client, worker)
        # Nothing held was lost: kombu's restore_visible requeues these after visibility_timeout.
        assert held <= unacked_ids(client)
    finally:
        worker.stop()
        server.stop()
        app.close()
        client.close()

