"""Operating the fleet: draining, why-not-this-node, idle reasons, the partition breaker."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis

from dispatcher.keys import Keys
from dispatcher.registry import Registry
from tests.support import T0, LiveNode, job_attempts, make_ready, register, wait_for


def submit(client: Any, **fields: Any) -> Any:
    return client.send_task("dispatcher.submit_job", task_id=f"job-{uuid.uuid4()}",
                            kwargs={"job_type": "asr", **fields})


AUTH = {"Authorization": "Bearer adm1n"}


def test_drain_over_http_needs_the_admin_token(system: Any, start_web: Any, live_nodes: Any, client: Any,
                                               r: redis.Redis) -> None:
    api = start_web(admin_token="adm1n", **{k: v for k, v in system.settings.items() if k != "admin_token"})
    node = live_nodes(system.web, {"m": "ready"}, labels={"who": "me"}, max_concurrent_jobs=2).wait_ready()
    job = submit(client, node_selector={"who": "me"})
    running = node.take_job()
    for headers in (None, {"Authorization": "Bearer wrong"}):
        status, body = api.request("POST", f"/api/nodes/{node.node_id}/drain", {"reason": "x"}, headers)
        assert status == 401 and "admin_token" in body["error"]
    assert r.hget(Keys().node(node.node_id), "status") == "ready"

    status, body = api.request("POST", f"/api/nodes/{node.node_id}/drain",
                               {"reason": "kernel upgrade", "requested_by": "alice"}, AUTH)
    assert status == 200 and (body["status"], body["jobs_left"]) == ("draining", 1)
    drain = body["drain"]
    assert (drain["requested_by"], drain["reason"], drain["jobs_left"], drain["in_progress"]) == (
        "alice", "kernel upgrade", 1, True)
    assert node.expect("node_status", status="draining")["reason"] == "drain requested by alice: kernel upgrade"
    other = submit(client, node_selector={"who": "me"})
    meta = wait_for(lambda: other.state == "WAITING" and other.info, what="why the next job waits")
    assert meta["exclusions"] == {"StatusNotReady": 1}, "a draining node gets no new job"
    node.succeed(running, "finished")
    assert job.get(timeout=10) == "finished"
    assert node.expect("node_status", status="offline")["reason"] == "drained: its last job ended"
    assert [f["job_id"] for f in node.assigned()] == [job.id]
    assert (r.hget(Keys().job(other.id), "state"), job_attempts(r, other.id)) == ("waiting", []), \
        "never given to the node while it drained"
    view = api.get(f"/api/nodes/{node.node_id}")[1]
    assert (view["drain"]["outcome"], view["drain"]["jobs_left"], view["drain"]["in_progress"]) == ("drained", 0, False)
    assert api.request("DELETE", "/api/nodes/nope/drain", headers=AUTH)[0] == 404
    assert api.request("POST", f"/api/nodes/{node.node_id}/drain", {"deadline_seconds": -1}, AUTH)[0] == 400
    assert api.request("POST", f"/api/nodes/{node.node_id}/drain", {}, AUTH)[0] == 409, "offline: nothing to drain"
    client.send_task("dispatcher.cancel_job", kwargs={"job_id": other.id}).get(timeout=10)


def test_cordon_over_http_stops_new_jobs_and_keeps_the_status(system: Any, start_web: Any, live_nodes: Any,
                                                                client: Any, r: redis.Redis) -> None:
    api = start_web(admin_token="adm1n", **{k: v for k, v in system.settings.items() if k != "admin_token"})
    node = live_nodes(system.web, {"m": "ready"}, labels={"who": "cord"}, max_concurrent_jobs=2).wait_ready()
    held = submit(client, node_selector={"who": "cord"})
    running = node.take_job()
    path = f"/api/nodes/{node.node_id}/cordon"
    assert api.request("POST", path, {"reason": "x"})[0] == 401
    status, body = api.request("POST", path, {"reason": "fan noise", "requested_by": "alice"}, AUTH)
    assert status == 200 and body["status"] == "ready"
    assert (body["cordon"]["reason"], body["cordon"]["requested_by"]) == ("fan noise", "alice")
    waiting = submit(client, node_selector={"who": "cord"})
    meta = wait_for(lambda: waiting.state == "WAITING" and waiting.info, what="why it waits")
    assert meta["exclusions"] == {"NodeCordoned": 1} and meta["examples"] == {"NodeCordoned": [node.node_id]}
    view = api.get(f"/api/nodes/{node.node_id}")[1]
    assert view["status"] == "ready" and view["cordon"]["reason"] == "fan noise" and len(view["assigned_jobs"]) == 1
    node.succeed(running, "kept running")
    assert held.get(timeout=10) == "kept running"
    assert api.request("POST", "/api/nodes/nope/cordon", {}, AUTH)[0] == 404
    assert api.request("POST", path, {"reason": 7}, AUTH)[0] == 400
    uncordoned_ms = time.time() * 1000
    status, body = api.request("DELETE", path, headers=AUTH)
    assert status == 200 and (body["status"], body["cordon"]) == ("ready", None)
    node.succeed(node.take_job(), "after the cordon")
    assert waiting.get(timeout=10) == "after the cordon"
    assert [f["job_id"] for f in node.assigned()] == [held.id, waiting.id]
    assert job_attempts(r, waiting.id)[0]["assigned_ms"] >= uncordoned_ms, \
        "a freed slot of a cordoned node takes nothing: the job went to it once uncordoned"


def test_forget_over_http_only_for_an_offline_node(system: Any, start_web: Any, live_nodes: Any,
                                                  r: redis.Redis) -> None:
    api = start_web(admin_token="adm1n", **{k: v for k, v in system.settings.items() if k != "admin_token"})
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    path = f"/api/nodes/{node.node_id}"
    assert api.request("DELETE", path)[0] == 401
    status, body = api.request("DELETE", path, headers=AUTH)
    assert status == 409 and body["error"].startswith(f"node {node.node_id} is ready: only an offline node")
    assert api.request("POST", f"{path}/drain", {}, AUTH)[1]["status"] == "offline"
    status, body = api.request("DELETE", path, headers=AUTH)
    assert status == 409 and "its session is open (a drained node)" in body["error"]
    node.close()
    wait_for(lambda: r.hget(Keys().node(node.node_id), "connected") == "0", what="session closed")
    assert api.request("DELETE", path, headers=AUTH) == (200, {"node_id": node.node_id, "forgotten": True})
    assert api.get(path)[0] == 404 and not r.exists(Keys().node(node.node_id))
    assert api.request("DELETE", path, headers=AUTH)[0] == 404


def test_drain_deadline_sends_what_is_left_elsewhere(system: Any, live_nodes: Any, client: Any,
                                                     r: redis.Redis) -> None:
    slow = live_nodes(system.web, {"m": "ready"}, labels={"pool": "p"}).wait_ready()
    result = submit(client, node_selector={"pool": "p"})
    slow.take_job()
    status, body = system.web.request("POST", f"/api/nodes/{slow.node_id}/drain", {"deadline_seconds": 1})
    assert status == 200 and body["status"] == "draining"
    spare = live_nodes(system.web, {"m": "ready"}, labels={"pool": "p"}).wait_ready()
    job = spare.take_job(timeout_s=15, attempt=2)
    cancel = slow.expect("job_cancel")
    assert "drain deadline passed with 1 job left" in cancel["reason"]
    spare.succeed(job, "rescued")
    assert result.get(timeout=10) == "rescued"
    history = job_attempts(r, result.id)
    assert [a["outcome"] for a in history] == ["DRAIN_DEADLINE", "succeeded"]
    assert r.hget(Keys().node(slow.node_id), "status") == "offline"


def test_undrain_returns_the_node_and_feeds_it_waiting_work(system: Any, live_nodes: Any, client: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}, labels={"who": "u"}).wait_ready()
    busy = submit(client, node_selector={"who": "u"})
    held = node.take_job()
    system.web.request("POST", f"/api/nodes/{node.node_id}/drain", {"reason": "maybe"})
    waiting = submit(client, node_selector={"who": "u"})
    wait_for(lambda: waiting.state == "WAITING", what="the job waiting while the node drains")
    status, body = system.web.request("DELETE", f"/api/nodes/{node.node_id}/drain")
    assert status == 200 and (body["status"], body["message"]) == ("ready", f"node {node.node_id} is ready")
    node.succeed(held, 1)
    node.succeed(node.take_job(), 2)
    assert (busy.get(timeout=10), waiting.get(timeout=10)) == (1, 2)


def test_drain_and_undrain_as_celery_tasks(system: Any, live_nodes: Any, client: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    held = submit(client, max_attempts=1)
    job = node.take_job()
    drained = client.send_task("dispatcher.drain_node", kwargs={"node_id": node.node_id, "reason": "rack move"})
    assert drained.get(timeout=10) == {"node_id": node.node_id, "status": "draining", "jobs_left": 1}
    assert node.expect("node_status", status="draining")["reason"].endswith("rack move")
    undrained = client.send_task("dispatcher.undrain_node", kwargs={"node_id": node.node_id})
    assert undrained.get(timeout=10) == "ready"
    with pytest.raises(Exception, match="no node nope"):
        client.send_task("dispatcher.drain_node", kwargs={"node_id": "nope"}).get(timeout=10)
    node.succeed(job, "ok")
    assert held.get(timeout=10) == "ok"


def test_a_drain_survives_the_node_reconnecting(system: Any, live_nodes: Any, client: Any, r: redis.Redis) -> None:
    node = live_nodes(system.web, {"m": "ready"}, labels={"who": "r"}).wait_ready()
    result = submit(client, node_selector={"who": "r"})
    job = node.take_job()
    system.web.request("POST", f"/api/nodes/{node.node_id}/drain", {"reason": "maintenance"})
    node.close()
    wait_for(lambda: r.hget(Keys().node(node.node_id), "status") == "offline", what="offline")
    back = LiveNode(system.web.ws_url, {"m": "ready"}, node_id=node.node_id, node_secret=node.secret)
    try:
        again = back.expect("job_assign")
        draining = back.expect("node_status", status="draining")
        assert draining["reason"] == "drain requested by HTTP client 127.0.0.1: maintenance (resumed)"
        back.succeed(again, "done while draining")
        assert result.get(timeout=10) == "done while draining"
        back.expect("node_status", status="offline")
        assert job["job_id"] == again["job_id"]
    finally:
        back.close()


def test_why_not_this_node(system: Any, live_nodes: Any, client: Any, r: redis.Redis) -> None:
    node = live_nodes(system.web, {"whisper": "ready", "nllb": "loading"}, labels={"zone": "a"}).wait_ready()
    node.usage["cpu_percent"] = 95.0
    wait_for(lambda: float(r.hget(Keys().node(node.node_id), "cpu_percent")) == 95, what="usage recorded")
    status, answer = system.web.get(f"/api/nodes/{node.node_id}/eligibility?required_models=whisper,nllb"
                                    "&require_gpu=true&public=true&node_selector=zone=b")
    assert status == 200 and answer["eligible"] is False and answer["first_failure"] == "NotInPublicPool"
    steps = {s["step"]: s for s in answer["steps"]}
    assert steps["status"]["passed"] and steps["status"]["detail"] == "status ready"
    assert steps["online"]["passed"] and "last heard" in steps["online"]["detail"]
    assert (steps["public_pool"]["passed"], steps["public_pool"]["detail"]) == (False, "accepts public jobs: no")
    assert steps["node_selector"]["detail"] == "missing labels zone=b"
    assert steps["gpu"]["detail"] == "GPU available: no"
    assert (steps["models"]["passed"], steps["models"]["detail"]) == (False, "not ready: nllb")
    assert steps["capacity"]["detail"] == "0/1 slots used"
    assert (steps["resources"]["passed"], steps["resources"]["detail"]) == (False, "cpu 95% >= 90%")
    result = submit(client, required_models=["nobody"])
    wait_for(lambda: r.exists(Keys().job(result.id)), what="the job recorded")
    status, answer = system.web.get(f"/api/nodes/{node.node_id}/eligibility?job={result.id}")
    assert status == 200 and answer["job"]["required_models"] == ["nobody"]
    assert answer["first_failure"] == "ModelNotAvailable"
    assert system.web.get("/api/nodes/nope/eligibility")[0] == 404
    assert system.web.get(f"/api/nodes/{node.node_id}/eligibility?job=nope")[0] == 404
    assert system.web.get(f"/api/nodes/{node.node_id}/eligibility?node_selector=zone")[0] == 400
    client.send_task("dispatcher.cancel_job", kwargs={"job_id": result.id}).get(timeout=10)


def test_periodic_status_says_why_a_ready_node_gets_nothing(system: Any, start_web: Any, live_nodes: Any,
                                                           r: redis.Redis) -> None:
    reporting = start_web(**{**system.settings, "status_report_interval_seconds": 0.3})
    node = live_nodes(reporting, {"m": "ready"}).wait_ready()
    node.usage["gpu_percent"] = 90.0
    wait_for(lambda: float(r.hget(Keys().node(node.node_id), "gpu_percent")) == 90, what="usage recorded")
    report = wait_for(lambda: next((f for f in reversed(node.all_frames) if f.get("type") == "node_status"
                                    and f.get("not_eligible")), None), what="a report with reasons")
    assert report["status"] == "ready" and report["not_eligible"] == ["ResourceThresholdExceeded: gpu 90% >= 90%"]
    assert report["health"]["last_healthy"] is True and report["health"]["consecutive_ok"] >= 1, \
        "the heartbeat of 90% GPU was a healthy one, since the node became ready"
    assert report["assigned_jobs"] == []


def test_partition_breaker_expires_a_mass_silence_at_a_bounded_rate(make_settings: Any, r: redis.Redis,
                                                                    keys: Keys) -> None:
    registry = Registry(r, make_settings(partition_offline_fraction=0.5, partition_offline_per_scan=3))
    for _ in range(10):
        make_ready(registry, register(registry, now=T0))
    first = registry.scan(now=T0 + 60_000)
    assert (len(first.expired), first.suspected_partition, first.deferred) == (3, True, 7)
    assert r.hgetall(keys.scan_state())["suspected_partition"] == "1"
    assert r.scard(keys.status_set("ready")) == 7, "the rest stay as they were, their jobs untouched"
    second = registry.scan(now=T0 + 61_000)
    assert (len(second.expired), second.deferred) == (3, 4)
    # a few silent among many live nodes is an ordinary outage: no breaker
    for _ in range(20):
        make_ready(registry, register(registry, now=T0 + 120_000), now=T0 + 120_000)
    third = registry.scan(now=T0 + 123_000 + 10_000)
    assert (len(third.expired), third.suspected_partition) == (4, False)
