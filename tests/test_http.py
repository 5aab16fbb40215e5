"""The HTTP endpoints of the web process."""

from __future__ import annotations

from typing import Any

import redis

from dispatcher.keys import Keys
from tests.support import WebServer, ready_node, wait_for


def test_health_endpoints(web: WebServer) -> None:
    assert web.get("/healthz")[0] == 200
    assert web.get("/readyz") == (200, {"status": "ok"})


def test_readyz_says_when_redis_is_unreachable(start_web: Any) -> None:
    lost = start_web(REDIS_URL="redis://127.0.0.1:1/0")
    status, body = lost.get("/readyz")
    assert status == 503 and body["status"] == "unavailable"
    assert lost.get("/healthz")[0] == 200, "the process itself is alive"


def test_node_list_and_detail(web: WebServer, nodes: Any, r: redis.Redis) -> None:
    node = ready_node(nodes, web, labels={"region": "eu"}, max_concurrent_jobs=3,
                      hardware={"cpu_cores": 8, "memory_gb": 32, "gpus": []})
    status, listing = web.get("/api/nodes")
    assert status == 200 and listing["counts"]["ready"] == 1
    assert [n["node_id"] for n in listing["nodes"]] == [node.node_id]
    status, detail = web.get(f"/api/nodes/{node.node_id}")
    assert status == 200
    assert (detail["status"], detail["reason"]) == ("ready", "3 consecutive healthy heartbeats")
    assert detail["last_heartbeat_ms"] > 0 and detail["last_heartbeat_age_s"] < 30
    assert detail["resource_usage"] == {"cpu_percent": 5.0, "gpu_percent": 1.0, "mem_percent": 10.0, "running_jobs": 0}
    assert detail["models"] == [{"model_id": "whisper", "status": "ready"}]
    assert (detail["labels"], detail["max_concurrent_jobs"]) == ({"region": "eu"}, 3)
    assert detail["health"]["window"] == "" and detail["assigned_jobs"] == []
    assert [(t["from"], t["to"]) for t in detail["transitions"]] == [("registering", "ready"), (None, "registering")]
    text = str(detail) + str(listing)
    assert node.secret not in text and "secret" not in text and "session_id" not in text


def test_unknown_node_is_404(web: WebServer, r: redis.Redis) -> None:
    status, body = web.get("/api/nodes/nope")
    assert status == 404 and "nope" in body["error"]


def test_node_list_filters_by_status(web: WebServer, nodes: Any, r: redis.Redis) -> None:
    ready = ready_node(nodes, web)
    nodes(web).register()
    status, listing = web.get("/api/nodes?status=ready")
    assert status == 200 and [n["node_id"] for n in listing["nodes"]] == [ready.node_id]
    assert web.get("/api/nodes?status=sleeping")[0] == 400
    assert r.zcard(Keys().nodes()) == 2


def test_node_list_pages_by_limit_and_cursor(web: WebServer, nodes: Any, r: redis.Redis) -> None:
    registered = sorted(nodes(web).register()["node_id"] for _ in range(3))
    status, first = web.get("/api/nodes?limit=2")
    assert status == 200 and [n["node_id"] for n in first["nodes"]] == registered[:2]
    assert first["next_cursor"] == registered[1]
    status, rest = web.get(f"/api/nodes?limit=2&cursor={first['next_cursor']}")
    assert [n["node_id"] for n in rest["nodes"]] == registered[2:] and rest["next_cursor"] is None
    assert list(first["counts"]) == ["registering", "ready", "degraded", "draining", "offline"]


def test_bad_query_values_are_json_400_and_unknown_api_paths_json_404(web: WebServer) -> None:
    for path in ("/api/nodes?limit=0", "/api/nodes?limit=ten", "/api/nodes?cursor=no%20such", "/api/nodes?status=up",
                 "/api/jobs?state=done", "/api/jobs?limit=501", "/api/jobs?cursor=x", "/api/jobs?node=a%2Fb",
                 "/api/transitions?limit=0", "/api/nodes/n-1/eligibility?require_gpu=maybe"):
        status, body = web.get(path)
        assert status == 400 and isinstance(body, dict) and body["error"], (path, status, body)
    for method, path in (("GET", "/api/nope"), ("GET", "/api/jobs/a/b"), ("POST", "/api/nodes/n-1/dance")):
        status, body = web.request(method, path)
        assert status in (404, 405) and isinstance(body, dict) and path.split("?")[0] in body["error"], (path, body)


def test_jobs_are_listed_newest_first_by_state_and_node(system: Any, client: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}, labels={"list": "me"}).wait_ready()
    done = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr", "node_selector": {"list": "me"}})
    node.succeed(node.take_job(job_id=done.id), "ok")
    assert done.get(timeout=10) == "ok"
    waiting = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr", "required_models": ["nobody"]})
    # Submitted in that order: the time of submission is the worker's, and two pool processes race.
    wait_for(lambda: waiting.state == "WAITING", what="the first submission recorded")
    running = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr", "node_selector": {"list": "me"}})
    node.take_job(job_id=running.id)
    status, listing = system.web.get("/api/jobs?limit=3")
    assert status == 200
    assert [(j["job_id"], j["state"]) for j in listing["jobs"]] == [
        (running.id, "running"), (waiting.id, "waiting"), (done.id, "succeeded")]
    status, page = system.web.get("/api/jobs?limit=1")
    assert [j["job_id"] for j in page["jobs"]] == [running.id] and page["next_cursor"]
    status, page = system.web.get(f"/api/jobs?limit=1&cursor={page['next_cursor']}")
    assert [j["job_id"] for j in page["jobs"]] == [waiting.id]
    assert [j["job_id"] for j in system.web.get(f"/api/jobs?state=succeeded&node={node.node_id}")[1]["jobs"]] == [
        done.id]
    assert [j["job_id"] for j in system.web.get(f"/api/jobs?state=running&node={node.node_id}")[1]["jobs"]] == [
        running.id]
    assert system.web.get("/api/jobs?state=waiting&node=n-nobody")[1] == {"jobs": [], "next_cursor": None}
    for result in (waiting, running):
        client.send_task("dispatcher.cancel_job", kwargs={"job_id": result.id}).get(timeout=10)


def test_job_record_and_dispatch_statistics(system: Any, client: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr", "required_models": ["m"]})
    job = node.take_job()
    node.send({"type": "job_progress", "job_id": job["job_id"], "attempt": 1, "progress": 0.25})
    node.succeed(job, {"ok": True})
    assert result.get(timeout=10) == {"ok": True}
    status, view = system.web.get(f"/api/jobs/{result.id}")
    assert status == 200
    assert (view["state"], view["node_id"], view["attempt"], view["required_models"]) == (
        "succeeded", node.node_id, 1, ["m"])
    assert view["outcome"]["state"] == "succeeded" and view["last_decision"]["outcome"] == "assigned"
    assert [(a["node_id"], a["outcome"]) for a in view["attempts"]] == [(node.node_id, "succeeded")]
    assert view["attempts"][0]["acked_ms"] >= view["attempts"][0]["assigned_ms"]
    assert system.web.get("/api/jobs/nope")[0] == 404
    # Each process writes its decision counts in sums, once a second.
    stats = wait_for(lambda: (s := system.web.get("/api/stats")[1])["decisions"].get("assigned") and s,
                     what="the decision counted")
    assert set(stats["excluded"]) == {"StatusNotReady", "NotInPublicPool", "NodeSelectorMismatch", "GpuUnavailable",
                                      "ModelNotAvailable", "NodeCordoned", "CapacityExceeded",
                                      "ResourceThresholdExceeded"}
