"""The periodic scan as it runs in production: Celery beat sends it, a worker runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dispatcher.keys import Keys
from tests.support import clean_env, start_procfile, wait_for


def test_beat_and_worker_expire_a_silent_node_and_tell_its_session(
        own_redis: Any, logs_dir: Path, start_web: Any, nodes: Any) -> None:
    redis_url, r = own_redis
    timing = {"heartbeat_timeout_seconds": 1.5, "periodic_scan_interval_seconds": 0.3, "require_gpu": False}
    env = clean_env(redis_url, **timing)
    worker = start_procfile("worker", {**env, "WORKER_CONCURRENCY": "1"}, logs_dir)
    beat = start_procfile("beat", env, logs_dir)
    try:
        server = start_web(REDIS_URL=redis_url, **timing)
        silent = nodes(server)
        silent.register()
        status = silent.expect("node_status", status="offline", timeout_s=30)
        assert status["reason"].startswith("no heartbeat for") and status["previous_status"] == "registering"
        assert silent.closed_with() == 4002
        wait_for(lambda: r.hget(Keys().scan_state(), "at_ms"), what="scan state recorded")
        # The scan that changed something says so at INFO (its state is written before its log line).
        wait_for(lambda: '"event": "scan_summary"' in worker.log(), what="the scan's summary in the worker's log")
    finally:
        for process in (beat, worker):
            process.stop()
    assert r.hget(Keys().node(silent.node_id), "status") == "offline"
