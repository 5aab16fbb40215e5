"""Flower (the Procfile's flower process) shows each job's life from task events."""

from __future__ import annotations

import json
import urllib.request
from typing import Any


def test_flower_shows_a_job_from_submission_to_its_end(system: Any, client: Any, live_nodes: Any,
                                                       flower: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr", "payload": {"a": 1}})
    node.succeed(node.take_job(), {"text": "hi"})
    assert result.get(timeout=10) == {"text": "hi"}
    task = flower.task_in_state(result.id, "SUCCESS")
    assert task["name"] == "dispatcher.submit_job"
    assert task["received"] and task["started"] and task["succeeded"]
    assert json.loads(task["result"]) == {"text": "hi"}, "the output as the node sent it"
    assert task["runtime"] == 0.005, "the node's own duration_ms"
    # The worker that took it: Flower links a worker to its page, which only a real worker has.
    assert "@worker." in task["worker"], task["worker"]
    assert task["routing_key"] == node.node_id, "the node that ran it"
    with urllib.request.urlopen(f"http://127.0.0.1:{flower.port}/worker/{task['worker']}", timeout=10) as page:
        assert page.status == 200, "the job's worker link leads to a worker's page"
    failing = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr", "max_attempts": 1})
    node.fail(node.take_job(), "MODEL_CRASHED", "boom", retryable=False)
    task = flower.task_in_state(failing.id, "FAILURE")
    assert "MODEL_CRASHED: boom" in task["exception"]
    assert f"on node {node.node_id}, attempt 1 of 1" in task["traceback"], task["traceback"]
    assert "@worker." in task["worker"] and task["routing_key"] == node.node_id
    workers = flower.call("/api/workers")
    assert any("@worker." in name for name in workers), workers.keys()
