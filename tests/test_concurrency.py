"""Atomicity: a heartbeat racing the scan, and two scans at once, never disagree.

The racers' scripts are held until each has reached its own, so that every round is a
race for real (left alone, one side is nearly always first), and each test checks that
the race went more than one way."""

from __future__ import annotations

import itertools
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


def gate(scripts: Any, names: tuple[str, ...], barrier: threading.Barrier, monkeypatch: Any) -> list[str]:
    """Hold the first call of each of these scripts until every racer has reached its own:
    then they go to Redis at the same moment, and Redis alone orders them. The calls made
    through the gate, by node, are listed in what it returns."""
    calls: list[str] = []
    for name in names:
        real, waited = getattr(scripts, name), threading.Event()

        def call(node_id: str, *args: Any, real: Any = real, waited: threading.Event = waited, **kwargs: Any) -> Any:
            if not waited.is_set():
                waited.set()
                barrier.wait()
            calls.append(node_id)
            return real(node_id, *args, **kwargs)
        monkeypatch.setattr(scripts, name, call)
    return calls


def test_heartbeat_racing_the_scan_applies_one_story(registry: Registry, r: redis.Redis, keys: Keys,
                                                     monkeypatch: Any) -> None:
    """Each round: a ready node's last heartbeat is exactly at the timeout when a
    heartbeat (which would keep it alive) and the scan (which would expire it)
    send their scripts at the same moment. Either may win, and over the rounds each
    does; they never both apply."""
    outcomes: Counter[str] = Counter()
    rounds = 0
    # At least 40 rounds, and on until each side has won (it takes a few: neither wins
    # less than one round in ten on a quiet machine); 400 without both is a failure.
    while rounds < 40 or (len(outcomes) < 2 and rounds < 400):
        rounds += 1
        forget_everything(r)
        reg = register(registry, now=T0)
        clash = make_ready(registry, reg) + 45_000
        barrier = threading.Barrier(2, timeout=10)
        gate(registry.scripts, ("record_heartbeat", "expire_node"), barrier, monkeypatch)
        results: dict[str, Any] = {}

        def heartbeat(results: Any = results, reg: Any = reg, clash: int = clash) -> None:
            results["beat"] = beat(registry, reg, clash)

        def scan(results: Any = results, clash: int = clash) -> None:
            results["scan"] = registry.scan(now=clash)
        threads = [threading.Thread(target=heartbeat), threading.Thread(target=scan)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        monkeypatch.undo()
        node_id = reg.node.node_id
        status = r.hget(keys.node(node_id), "status")
        expired = node_id in results["scan"].expired
        if expired:
            assert status == "offline" and results["beat"].refused == "offline"
        else:
            assert status == "ready" and results["beat"].outcome.status == "ready"
        history = _history(r, keys, node_id)
        assert all(a["to"] == b["from"] for a, b in itertools.pairwise(history)), history
        assert_consistent(r, keys)
        outcomes["expired" if expired else "kept alive"] += 1
    assert outcomes["expired"] >= 1 and outcomes["kept alive"] >= 1, f"the race never went both ways: {outcomes}"


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


def test_two_scans_at_once_expire_each_node_once(r: redis.Redis, keys: Keys, make_settings: Any,
                                                  monkeypatch: Any) -> None:
    """Both scans read all 60 nodes as silent before either takes one offline (their first
    expire script waits for the other's), then race through them, each trying every node:
    each node goes offline once."""
    # Every node falls silent at once, which the partition breaker would slow down: not under test here.
    settings = make_settings(partition_offline_fraction=1)
    registry = Registry(r, settings)
    ids = []
    for i in range(60):
        reg = register(registry, now=T0 + i)
        make_ready(registry, reg, now=T0 + i)
        ids.append(reg.node.node_id)
    other = Registry(redis.Redis.from_url(settings.redis_url, decode_responses=True), settings)
    barrier = threading.Barrier(2, timeout=10)
    tried = [gate(scanner.scripts, ("expire_node",), barrier, monkeypatch) for scanner in (registry, other)]
    summaries: list[Any] = []

    def scan(reg: Registry) -> None:
        summaries.append(reg.scan(now=T0 + 10 * 60_000))
    threads = [threading.Thread(target=scan, args=(x,)) for x in (registry, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expired = summaries[0].expired + summaries[1].expired
    assert sorted(expired) == sorted(ids), "every node expired exactly once across both scans"
    assert [sorted(nodes) for nodes in tried] == [sorted(ids)] * 2, "both scans raced for every node"
    for node_id in ids:
        offline = [h for h in _history(r, keys, node_id) if h["to"] == "offline"]
        assert len(offline) == 1
    assert_consistent(r, keys)
