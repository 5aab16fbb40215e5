"""Flower (the Procfile's flower process) shows each job's life from task events."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from dispatcher.localredis import free_port
from tests.support import clean_env, start_procfile, wait_for


def flower_get(port: int, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


def test_flower_shows_a_job_from_submission_to_its_end(system: Any, client: Any, live_nodes: Any,
                                                       logs_dir: Path) -> None:
    port = free_port()
    env = clean_env(system.redis_url, **system.settings, FLOWER_PORT=port, FLOWER_UNAUTHENTICATED_API="true")
    flower = start_procfile("flower", env, logs_dir)
    try:
        wait_for(lambda: flower_get(port, "/api/workers?refresh=1"), 30, 0.3, what="flower up, seeing the worker")
        node = live_nodes(system.web, {"m": "ready"}).wait_ready()
        result = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr", "payload": {"a": 1}})
        node.succeed(node.take_job(), {"text": "hi"})
        assert result.get(timeout=10) == {"text": "hi"}
        task = wait_for(lambda: (t := flower_get(port, f"/api/task/info/{result.id}")) and t.get("state") == "SUCCESS"
                        and t, 20, 0.3, what="flower sees the job succeed")
        assert task["name"] == "dispatcher.submit_job"
        assert task["received"] and task["started"] and task["succeeded"]
        assert json.loads(task["result"]) == {"text": "hi"}, "the output as the node sent it"
        # The worker that took it: Flower links a worker to its page, which only a real worker has.
        assert "@worker." in task["worker"], task["worker"]
        assert task["routing_key"] == node.node_id, "the node that ran it"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/worker/{task['worker']}", timeout=10) as page:
            assert page.status == 200, "the job's worker link leads to a worker's page"
        failing = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr", "max_attempts": 1})
        node.fail(node.take_job(), "MODEL_CRASHED", "boom", retryable=False)
        task = wait_for(lambda: (t := flower_get(port, f"/api/task/info/{failing.id}")) and t.get("state") == "FAILURE"
                        and t, 20, 0.3, what="flower sees the job fail")
        assert "MODEL_CRASHED: boom" in task["exception"]
        assert f"on node {node.node_id}, attempt 1 of 1" in task["traceback"], task["traceback"]
        assert "@worker." in task["worker"] and task["routing_key"] == node.node_id
        workers = flower_get(port, "/api/workers")
        assert any("@worker." in name for name in workers), workers.keys()
    finally:
        flower.stop()
