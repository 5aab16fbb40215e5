"""Frames a fuzzer sends, and what must hold after them. Shared by
tests/test_fuzz.py (hypothesis drives the random source, and shrinks) and
bench/fuzz.py (100,000 frames)."""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass, field
from typing import Any

import redis

from dispatcher.keys import Keys
from dispatcher.vocabulary import NodeStatus

#: The codes the contract lets the server answer with.
ERROR_CODES = {"NODE_ID_CONFLICT", "UNAUTHORIZED", "INVALID_MESSAGE", "MESSAGE_TOO_LARGE", "NOT_REGISTERED",
               "NODE_ID_MISMATCH", "RATE_LIMITED", "INTERNAL_ERROR"}
#: What the server may send a node at all.
SERVER_TYPES = {"error", "node_register_ack", "node_status", "job_assign", "job_cancel"}
#: Log events that would mean a frame reached code that did not expect it.
CRASH_EVENTS = ('"event": "session_crashed"', '"event": "frame_failed"', '"event": "hub_tick_crashed"',
                "Traceback")
TYPES = ("node_register", "node_heartbeat", "job_ack", "job_progress", "job_result", "node_drain")


@dataclass
class Targets:
    """What the fuzzer knows of the fleet: other nodes' ids and their jobs (job id, attempt)."""

    node_ids: list[str] = field(default_factory=list)
    jobs: list[tuple[str, int]] = field(default_factory=list)


def _text(rng: random.Random, longest: int = 40) -> str:
    alphabet = string.printable + "éü\u2028\U0001f600\x00"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def _number(rng: random.Random) -> Any:
    return rng.choice([0, 1, -1, 0.5, 100, 101, 1_000_000, 1_000_001, 10**17, -10**17, 1e308, 2**63, 3.14,
                       rng.uniform(-200, 200), rng.randint(-5, 5)])


def _value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(9 if depth < 4 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice in (2, 3):
        return _number(rng)
    if choice in (4, 5):
        return _text(rng)
    if choice == 6:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_text(rng, 8): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _models(rng: random.Random) -> list[dict[str, Any]]:
    return [{"model_id": rng.choice(["whisper", "m", _text(rng, 10)]),
             "status": rng.choice(["ready", "Ready", "loading", "error", "warm", 3])}
            for _ in range(rng.randint(0, 3))]


def valid_ish(rng: random.Random, kind: str, own_id: str | None, targets: Targets) -> dict[str, Any]:
    """A frame of ``kind`` that is mostly right: the fields the contract names, with
    values drawn near and across their bounds, and ids of other nodes and their jobs."""
    node_id = rng.choice([own_id, None, *targets.node_ids[:3], _text(rng, 70)])
    job_id, attempt = rng.choice(targets.jobs) if targets.jobs and rng.random() < 0.6 else (
        rng.choice(["j", _text(rng, 130)]), rng.choice([1, 0, 2, -1]))
    if kind == "node_register":
        frame: dict[str, Any] = {"node_id": rng.choice([None, *targets.node_ids[:3], _text(rng, 70), "fz-node"]),
                                 "node_secret": rng.choice([None, _text(rng)]),
                                 "installed_models": _models(rng),
                                 "max_concurrent_jobs": rng.choice([1, 4, 0, 2000]),
                                 "labels": {rng.choice(["region", "bad key"]): rng.choice(["eu", "x y"])},
                                 "hardware": {"cpu_cores": _number(rng), "gpus": [{"name": "g", "memory_gb": 8}]},
                                 "advanced_features": {"f": _value(rng)}}
    elif kind == "node_heartbeat":
        frame = {"node_id": node_id, "timestamp": _number(rng),
                 "resource_usage": {"cpu_percent": _number(rng), "gpu_percent": _number(rng),
                                    "mem_percent": _number(rng), "running_jobs": _number(rng)},
                 "installed_models": _models(rng), "gpu_available": rng.choice([True, False, None, 1])}
    elif kind == "job_ack":
        frame = {"job_id": job_id, "attempt": attempt, "node_id": node_id}
    elif kind == "job_progress":
        frame = {"job_id": job_id, "attempt": attempt, "progress": rng.choice([0.5, 1.5, -0.1, None]),
                 "message": _text(rng)}
    elif kind == "job_result":
        frame = {"job_id": job_id, "attempt": attempt, "success": rng.choice([True, False, "yes"]),
                 "output": _value(rng), "duration_ms": _number(rng),
                 "error": rng.choice([None, {"code": "X", "message": _text(rng), "retryable": True}])}
    else:
        frame = {"reason": _text(rng), "deadline_seconds": rng.choice([None, 1, -1, 1e12])}
    for name in list(frame):
        if rng.random() < 0.1:
            del frame[name]
        elif rng.random() < 0.05:
            frame[name] = _value(rng)
    return {"type": kind, **frame}


def random_frame(rng: random.Random, own_id: str | None, targets: Targets) -> str | bytes:
    """One frame: well-formed or not, for this session's node or another's."""
    pick = rng.random()
    kind = rng.choice(TYPES)
    text = json.dumps(valid_ish(rng, kind, own_id, targets))
    if pick < 0.55:
        return text
    if pick < 0.65:
        return text[:rng.randint(0, max(0, len(text) - 1))]  # truncated
    if pick < 0.72:
        return json.dumps({"type": rng.choice([_text(rng, 12), 5, None, ["node_register"]]), "x": _value(rng)})
    if pick < 0.78:
        depth = rng.choice([60, 190, 250, 5000])
        return f'{{"type": "{kind}", "output": ' + "[" * depth + "]" * depth + "}"
    if pick < 0.83:
        return text.replace("0", "NaN", 1).replace("1", "Infinity", 1)
    if pick < 0.88:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
    if pick < 0.92:
        return json.dumps(_value(rng))
    if pick < 0.96:
        return text[:-1] + ', "' + _text(rng, 5) + '": ' + json.dumps(_value(rng)) + "}"
    pad = "z" * rng.choice([1000, 60_000, 200_000])
    return f'{{"type": "{kind}", "pad": "{pad}"}}'


def check_answer(frame: dict[str, Any]) -> str | None:
    """What is wrong with one frame the server sent, or None."""
    if frame.get("type") not in SERVER_TYPES:
        return f"unknown frame type {frame.get('type')!r}"
    if frame["type"] == "error" and frame.get("code") not in ERROR_CODES:
        return f"error code {frame.get('code')!r} is not the contract's"
    return None


def check_log(log: str) -> list[str]:
    return [line[:300] for line in log.splitlines() if any(mark in line for mark in CRASH_EVENTS)]


def check_records(client: redis.Redis, keys: Keys) -> list[str]:
    """Every node and job record agrees with the indexes that name it."""
    problems: list[str] = []
    nodes = set(client.zrange(keys.nodes(), 0, -1))
    in_sets = {status: client.smembers(keys.status_set(status)) for status in NodeStatus}
    for node_id in nodes:
        status = client.hget(keys.node(node_id), "status")
        holders = [s for s, members in in_sets.items() if node_id in members]
        if holders != [status]:
            problems.append(f"node {node_id} is {status} but in status sets {holders}")
        max_jobs = int(client.hget(keys.node(node_id), "max_concurrent_jobs") or 1)
        assigned = client.hgetall(keys.assigned(node_id))
        in_capacity = client.zscore(keys.capacity_index(), node_id)
        if (in_capacity is not None) != (status == "ready" and len(assigned) < max_jobs):
            problems.append(f"node {node_id} ({status}): {len(assigned)}/{max_jobs} slots, "
                            f"capacity index says {in_capacity}")
        for job_id in assigned:
            state, on = client.hmget(keys.job(job_id), "state", "node_id")
            if state not in ("assigned", "running") or on != node_id:
                problems.append(f"node {node_id} holds job {job_id}, which is {state} on {on!r}")
    for indexed in in_sets.values():
        if indexed - nodes:
            problems.append(f"status set names unknown nodes {sorted(indexed - nodes)[:5]}")
    waiting = set(client.zrange(keys.waiting(), 0, -1))
    in_kinds: set[str] = set()
    for kind in client.zrange(keys.waiting_classes(), 0, -1):
        members = client.zrange(keys.waiting_class(kind), 0, -1)
        if not members:
            problems.append(f"empty kind {kind} still ranked")
        in_kinds |= set(members)
    if in_kinds != waiting:
        problems.append(f"waiting jobs and kinds disagree: {sorted(waiting ^ in_kinds)[:5]}")
    for job_id in waiting:
        if client.hget(keys.job(job_id), "state") != "waiting":
            problems.append(f"job {job_id} queued as waiting but is {client.hget(keys.job(job_id), 'state')}")
    return problems
