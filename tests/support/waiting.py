"""Waiting, and the positive signals worth waiting for.

A test never sleeps a fixed time and then asserts that nothing happened: it waits
for something that can only come after the moment it is about (an answer to a
later frame, a scan that began later, a task acknowledged), then asserts what
should not have happened did not.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis

from dispatcher.keys import Keys


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10, interval_s: float = 0.02,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)




def wait_for_scans(client: redis.Redis, keys: Keys, after_ms: int, count: int = 1, timeout_s: float = 10) -> int:
    """Wait until the beat's periodic scan has run ``count`` times at or after ``after_ms`` (its own
    clock, as it writes it in ``Keys.scan_state()``); the time of the last of them. A scan writes
    that time between its nodes' part and its jobs' part: a second scan means the first ended."""
    seen = after_ms - 1
    for n in range(count):
        seen = wait_for(lambda last=seen: (at := int(client.hget(keys.scan_state(), "at_ms") or 0)) > last and at,
                        timeout_s, 0.05, what=f"scan {n + 1} of {count} after {after_ms}")
    return seen


def unacked_ids(client: redis.Redis) -> set[str]:
    """The task ids in kombu's unacked hash: delivered to a worker, not acknowledged."""
    return {json.loads(raw)[0]["headers"]["id"] for raw in client.hvals("unacked")}


def wait_until_acknowledged(client: redis.Redis, task_id: str, timeout_s: float = 10) -> None:
    """A task the worker was given (it did something) is acknowledged: with ``task_acks_late``
    a worker acknowledges a task once it has returned, so whatever it does on return is done."""
    wait_for(lambda: task_id not in unacked_ids(client), timeout_s, 0.05, what=f"task {task_id} acknowledged")
