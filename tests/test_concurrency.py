"""Atomicity: a heartbeat racing the scan, and two scans at once, never disagree."""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any

import redis

from dispatcher.keys import Keys
from dispatcher.registry import Registry
from tests.support import T0, assert_consistent, beat, forget_everything, make_ready, register


def _history(r: redis.Redis, keys: Keys, node_id: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in reversed(r.lrange(keys.node_transitions(node_id), 0, -1))]


def test_heartbeat_racing_the_scan_applies_one_story(registry: Registry, r: redis.Redis, keys: Keys,
                                                     settings: Any) -> None:
    """Each round: a ready node's last heartbeat is exactly at the timeout when a
    heartbeat (which would keep it alive) and the scan (which would expire it)
    run at the same moment. Either may win; they must never both apply."""
    outcomes = Counter()
    for _ in range(40):
        forget_everything(r)
        reg = register(registry, now=T0)
        last = make_ready(registry, reg)
        clash = last + 45_000
        barrier = threading.Barrier(2)
        results: dict[str, Any] = {}

        def heartbeat(barrier: Any = barrier, results: Any = results, reg: Any = reg, clash: int = clash) -> None:
            barrier.wait()
            results["beat"] = beat(registry, reg, clash)

        def scan(barrier: Any = barrier, results: Any = results, clash: int = clash) -> None:
            barrier.wait()
            results["scan"] = registry.scan(now=clash)
        threads = [threading.Thread(target=heartbeat), threading.Thread(target=scan)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        node_id = reg.node.node_id
        status = r.hget(keys.node(node_id), "status")
        expired = node_id in results["scan"].expired
        if expired:
            assert status == "offline" and results["beat"].refused == "offline"
        else:
            assert status == "ready" and results["beat"].outcome.status == "ready"
        history = _history(r, keys, node_id)
        assert all(a["to"] == b["from"] for a, b in zip(history, history[1:])), history
        assert_consistent(r, keys)
        outcomes["expired" if expired else "kept alive"] += 1
    assert sum(outcomes.values()) == 40


def test_a_heartbeat_between_the_scans_read_and_its_script_keeps_the_node(
        registry: Registry, r: redis.Redis, keys: Keys, monkeypatch: Any) -> None:
    """The scan reads the node as silent from the index; the heartbeat lands before
    the expire script runs; the script checks again and leaves the node alone."""
    reg = register(registry, now=T0)
    last = make_ready(registry, reg)
    clash = last + 45_000
    real_expire = registry.scripts.expire_node

    def heartbeat_first(*args: Any, **kwargs: Any) -> Any:
        assert beat(registry, reg, clash).outcome.status == "ready"
        return real_expire(*args, **kwargs)
    monkeypatch.setattr(registry.scripts, "expire_node", heartbeat_first)
    assert registry.scan(now=clash).expired == []
    assert r.hget(keys.node(reg.node.node_id), "status") == "ready"
    assert_consistent(r, keys)


def test_two_scans_at_once_expire_each_node_once(r: redis.Redis, keys: Keys, make_settings: Any) -> None:
    # Every node falls silent at once, which the partition breaker would slow down: not under test here.
    settings = make_settings(partition_offline_fraction=1)
    registry = Registry(r, settings)
    ids = []
    for i in range(60):
        reg = register(registry, now=T0 + i)
        make_ready(registry, reg, now=T0 + i)
        ids.append(reg.node.node_id)
    other = Registry(redis.Redis.from_url(settings.redis_url, decode_responses=True), settings)
    barrier = threading.Barrier(2)
    summaries: list[Any] = []

    def scan(reg: Registry) -> None:
        barrier.wait()
        summaries.append(reg.scan(now=T0 + 10 * 60_000))
    threads = [threading.Thread(target=scan, args=(x,)) for x in (registry, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expired = summaries[0].expired + summaries[1].expired
    assert sorted(expired) == sorted(ids), "every node expired exactly once across both scans"
    for node_id in ids:
        offline = [h for h in _history(r, keys, node_id) if h["to"] == "offline"]
        assert len(offline) == 1
    assert_consistent(r, keys)
