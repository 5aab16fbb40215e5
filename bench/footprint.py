"""What a node, a heartbeat and a job record cost Redis: the figures docs/scaling.md uses.

    python bench/footprint.py

On a private redis-server, through the registry and the job code (no web or
worker processes): bytes of Redis memory per node (10,000 nodes with 2 models
and 2 labels), Redis time and commands of a heartbeat (5,000), bytes per
waiting job (10,000) and per finished job (5,000: its record and its Celery
result, a 100-byte output). The last line is one JSON object of the figures.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import redis
from celery import Celery

from dispatcher.completions import Completions
from dispatcher.jobs import Jobs
from dispatcher.messages import NodeHeartbeat, NodeRegister, decode_node_message
from dispatcher.registry import Registry
from dispatcher.settings import load_settings
from selection import NOW_MS, LocalRedis

MODELS = [{"model_id": "whisper-large-v3", "status": "ready"}, {"model_id": "nllb-200", "status": "ready"}]
PAYLOAD = {"audio_url": "https://example.com/a/" + "x" * 60}


def main() -> None:
    store = LocalRedis(Path(tempfile.mkdtemp(prefix="bench-footprint-")) / "redis", append_only=False).start()
    client = redis.Redis.from_url(store.url, decode_responses=True)
    settings = load_settings(redis_url=store.url, require_gpu=False, resource_threshold_percent=100,
                             heartbeat_timeout_seconds=3600)
    registry = Registry(client, settings, clock=lambda: NOW_MS)
    jobs = Jobs(client, settings, Celery(broker=store.url, backend=store.url), clock=lambda: NOW_MS)

    def used() -> int:
        return int(client.info("memory")["used_memory"])
    figures: dict[str, float] = {}
    try:
        before, nodes = used(), []
        beat = NodeHeartbeat.model_validate_json(json.dumps({
            "type": "node_heartbeat", "gpu_available": True, "installed_models": MODELS,
            "resource_usage": {"cpu_percent": 5, "gpu_percent": 5, "mem_percent": 5, "running_jobs": 0}}))
        for i in range(10_000):
            msg = NodeRegister.model_validate_json(json.dumps({
                "type": "node_register", "max_concurrent_jobs": 4, "installed_models": MODELS,
                "hardware": {"gpus": [{"name": "L4", "memory_gb": 24}]}, "labels": {"region": "eu-west", "tier": "a"}}))
            node = registry.register(msg, f"s{i}", "w", now=NOW_MS - 10_000).node
            nodes.append(node)
            for k in range(3):
                registry.heartbeat(node, beat, now=NOW_MS - 3_000 + k * 1_000)
        figures["bytes_per_node"] = round((used() - before) / len(nodes))

        client.config_resetstat()
        for node in nodes[:5_000]:
            registry.heartbeat(node, beat, now=NOW_MS)
        stats = client.info("commandstats")
        figures["heartbeat_redis_us"] = round(stats["cmdstat_evalsha"]["usec"] / 5_000, 1)
        figures["heartbeat_script_calls"] = stats["cmdstat_evalsha"]["calls"] / 5_000
        figures["heartbeat_commands"] = round(sum(v["calls"] for k, v in stats.items()
                                                  if k != "cmdstat_config|resetstat") / 5_000, 1)

        before = used()
        for i in range(10_000):
            jobs.submit(f"w-{i}", {"job_type": "bench", "required_models": ["nobody"], "payload": PAYLOAD})
        figures["bytes_per_waiting_job"] = round((used() - before) / 10_000)

        completions = Completions(jobs, "footprint")
        before = used()
        for i in range(5_000):
            decision = jobs.submit(f"f-{i}", {"job_type": "bench", "required_models": ["nllb-200"], "payload": PAYLOAD})
            assert decision is not None and decision.node_id, decision
            frame = json.dumps({"type": "job_result", "job_id": f"f-{i}", "attempt": 1, "success": True,
                                "output": {"text": "y" * 100}})
            jobs.report_result(decision.node_id, decode_node_message(frame))  # type: ignore[arg-type]
            completions.apply(completions.read(None))
        completions.trim()
        figures["bytes_per_finished_job"] = round((used() - before) / 5_000)
    finally:
        store.stop()
    print(f"\n{'a node (2 models, 2 labels)':44s} {figures['bytes_per_node']:8,d} bytes")
    print(f"{'a heartbeat':44s} {figures['heartbeat_redis_us']:8.1f} µs of Redis time, "
          f"{figures['heartbeat_script_calls']:.0f} script call, {figures['heartbeat_commands']:.0f} commands")
    print(f"{'a waiting job':44s} {figures['bytes_per_waiting_job']:8,d} bytes")
    print(f"{'a finished job (record + Celery result)':44s} {figures['bytes_per_finished_job']:8,d} bytes")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
