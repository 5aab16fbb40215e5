"""The core on real Redis, in the test process, with the clock injected: nodes registered
and heartbeating through ``Registry``, results applied as a worker applies them, the
records checked against their indexes."""

from __future__ import annotations

import json
from typing import Any

import redis

from dispatcher.keys import Keys
from dispatcher.messages import NodeHeartbeat, NodeRegister
from dispatcher.registry import Registration, Registry
from dispatcher.vocabulary import NodeStatus

#: The injected clock's start (ms since 1970, in 2027): no test depends on the real time.
T0 = 1_800_000_000_000
#: A key prefix of the core tests' own: the session's running system never touches it.
CORE_PREFIX = "{coretest}"


def client_app(redis_url: str) -> Any:
    """A client as the contract writes it: nothing of the project, only celery."""
    from celery import Celery

    return Celery(broker=redis_url, backend=redis_url)


def forget_everything(client: redis.Redis) -> None:
    """Delete the dispatcher's keys and Celery's results, but not kombu's
    bindings and queues: a running worker would stop hearing its queues."""
    for pattern in ("{*", "celery-task-meta-*"):  # every key prefix the tests use starts with "{"
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start:start + 1000])


# --- nodes, as a web process registers them -----------------------------------------------


def register(registry: Registry, now: int = T0, **fields: Any) -> Registration:
    """A node_register frame with these fields, handled at ``now``."""
    msg = NodeRegister.model_validate_json(json.dumps({"type": "node_register", **fields}))
    return registry.register(msg, session_id=f"s-{now}", web_id="test", now=now)


def beat(registry: Registry, reg: Registration, now: int, models: dict[str, str] | None = None,
         **fields: Any) -> Any:
    """A heartbeat of the node at ``now`` (low usage; these model statuses, these fields)."""
    frame: dict[str, Any] = {"type": "node_heartbeat", "resource_usage": {"cpu_percent": 5, "mem_percent": 5}}
    if models is not None:
        frame["installed_models"] = [{"model_id": m, "status": s} for m, s in models.items()]
    frame.update(fields)
    return registry.heartbeat(reg.node, NodeHeartbeat.model_validate_json(json.dumps(frame)), now=now)


def make_ready(registry: Registry, reg: Registration, now: int = T0) -> int:
    """Three healthy heartbeats a second apart (whisper ready): the node is ready. The time of the last."""
    for i in range(1, 4):
        beat(registry, reg, now + i * 1000, {"whisper": "ready"})
    return now + 3000


def add_node(registry: Registry, *, beats: int = 3, last_beat_ms: int = T0 + 9_000,
             models: dict[str, str] | None = None,
             labels: dict[str, str] | None = None, public: bool = False, gpu: bool = False, gpu_available: bool = True,
             max_jobs: int = 1, usage: tuple[float, float, float] = (5, 5, 5)) -> str:
    """A node registered at T0 with these capabilities, its last heartbeat at ``last_beat_ms``
    (three: ready; fewer: still registering). Its id."""
    models = models or {}
    msg = NodeRegister.model_validate_json(json.dumps({
        "type": "node_register", "accept_public_jobs": public, "max_concurrent_jobs": max_jobs, "labels": labels or {},
        "installed_models": [{"model_id": m, "status": s} for m, s in models.items()],
        "hardware": {"gpus": [{"name": "L4", "memory_gb": 24}] if gpu else []}}))
    reg = registry.register(msg, "s", "w", now=T0)
    for i in range(beats):
        heartbeat = NodeHeartbeat.model_validate_json(json.dumps({
            "type": "node_heartbeat", "gpu_available": gpu_available,
            "resource_usage": {"cpu_percent": usage[0], "gpu_percent": usage[1], "mem_percent": usage[2]}}))
        registry.heartbeat(reg.node, heartbeat, now=last_beat_ms - (beats - 1 - i) * 100)
    return reg.node.node_id


# --- jobs -------------------------------------------------------------------------------------


def apply_result(jobs: Any, node_id: str, msg: Any, kind: str | None = None) -> str:
    """A node's result as a web process hands it on and a worker applies it: the outcome
    ("stale" when the web process already knew it for one)."""
    from dispatcher.completions import Completions

    if not jobs.report_result(node_id, msg, kind):
        return "stale"
    completions = Completions(jobs, "tests")
    outcomes = []
    for entry_id, fields in completions.read(None):
        outcomes.append(jobs.complete(fields)[0])
        jobs.client.xack(jobs.keys.results(), "completers", entry_id)
    assert len(outcomes) == 1, outcomes
    return str(outcomes[0])


def job_attempts(client: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    """The job's ended attempts (node, assigned, acked, ended, outcome), oldest first."""
    return json.loads(client.hget(Keys().job(job_id), "attempts") or "[]")



# --- records and their indexes ----------------------------------------------------------------


def assert_consistent(client: redis.Redis, keys: Keys) -> None:
    """Every node is in exactly the status set its record names; the indexes agree."""
    nodes = set(client.zrange(keys.nodes(), 0, -1))
    in_sets = {status: client.smembers(keys.status_set(status)) for status in NodeStatus}
    live = set(client.zrange(keys.liveness(), 0, -1))
    warming = set(client.zrange(keys.warmup(), 0, -1))
    offline = set(client.zrange(keys.offline_since(), 0, -1))
    for indexed in (*in_sets.values(), live, warming, offline):
        assert indexed <= nodes, f"indexed but not known: {indexed - nodes}"
    for node_id in nodes:
        status = client.hget(keys.node(node_id), "status")
        holders = [s for s, members in in_sets.items() if node_id in members]
        assert holders == [status], f"{node_id} is {status} but in sets {holders}"
        assert (node_id in live) == (status != "offline"), f"{node_id} ({status}) liveness index disagrees"
        assert (node_id in warming) == (status == "registering"), f"{node_id} ({status}) warmup index disagrees"
        assert (node_id in offline) == (status == "offline"), f"{node_id} ({status}) offline index disagrees"
    cordoned = client.smembers(keys.cordoned())
    assert cordoned <= nodes, f"cordoned but not known: {cordoned - nodes}"
    for node_id in cordoned:
        assert client.hget(keys.node(node_id), "cordoned") == "1", f"{node_id} in the cordoned set, not cordoned"
        assert client.zscore(keys.capacity_index(), node_id) is None, f"{node_id} cordoned and in the capacity index"
