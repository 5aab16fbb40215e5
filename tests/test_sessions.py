"""Node sessions over real WebSockets against the real web process (gevent gunicorn)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from dispatcher.keys import Keys
from dispatcher.localrun.redis_server import LocalRedis
from dispatcher.registry import Registry
from tests.support import WebServer, assert_consistent, integral_floats, log_events, ready_node, wait_for


def test_register_ack_and_first_status(web: WebServer, nodes: Any) -> None:
    node = nodes(web)
    ack = node.register(version="t/1", installed_models=[{"model_id": "whisper", "status": "loading"}])
    assert ack["status"] == "registering" and ack["node_id"].startswith("n-") and ack["node_secret"]
    assert (ack["heartbeat_interval_seconds"], ack["heartbeat_timeout_seconds"]) == (15, 45)
    status = node.expect("node_status")
    assert (status["status"], status["previous_status"], status["node_id"]) == ("registering", None, ack["node_id"])
    assert isinstance(status["timestamp"], int) and abs(status["timestamp"] - time.time() * 1000) < 60_000


def test_heartbeats_make_a_node_ready_and_failures_degrade_it(web: WebServer, nodes: Any) -> None:
    node = ready_node(nodes, web)
    for _ in range(3):
        node.heartbeat({"whisper": "error"})
    degraded = node.expect("node_status", status="degraded")
    assert degraded["previous_status"] == "ready"
    assert degraded["reason"] == "3 consecutive failed health checks (model whisper is error)"


def test_frames_before_registering_are_refused(web: WebServer, nodes: Any) -> None:
    node = nodes(web)
    for frame in ({"type": "node_heartbeat"}, {"type": "job_ack", "job_id": "j", "attempt": 1},
                  {"type": "node_drain"}):
        node.send(frame)
        error = node.expect("error")
        assert (error["code"], error["ref_type"]) == ("NOT_REGISTERED", frame["type"])


@pytest.mark.parametrize("frame", [{"type": "node_teleport"}, {"type": "node_register_ack"}, {"type": 7},
                                   {"type": "Node_Heartbeat", "node_id": "n-1"}])
def test_an_unknown_type_before_registering_is_invalid_not_unregistered(web: WebServer, nodes: Any,
                                                                       frame: Any) -> None:
    node = nodes(web)
    node.send(frame)
    error = node.expect("error")
    assert (error["code"], error["ref_type"]) == ("INVALID_MESSAGE", None)
    assert "unknown message type" in error["message"]
    # A known type that also fails validation is still refused for want of registration.
    node.send({"type": "node_heartbeat", "resource_usage": {"cpu_percent": "high"}})
    assert node.expect("error")["code"] == "NOT_REGISTERED"
    node.register()  # the session is still open


def records(r: redis.Redis) -> dict[str, Any]:
    """Every key's value but the fleet's counters, which each process adds to Redis once a
    second whatever happens (dispatcher/tally.py), and the scan's state."""
    keys = Keys()
    aside = {keys.stats(), keys.stats_histograms(), keys.stats_examples(), keys.scan_state()}
    return {k: r.dump(k) for k in r.keys("*") if k not in aside}


@pytest.mark.parametrize(("frame", "names"), [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    # 100 KB, inside the frame limit: refused by the parser's depth bound, not the stack's.
    ('{"type": "node_heartbeat", "x": ' + "[" * 50_000 + "]" * 50_000 + "}", "not JSON"),
    ({"no_type": 1}, "type"),
    ({"type": "node_teleport"}, "unknown message type"),
    ({"type": "node_heartbeat", "resource_usage": {"cpu_percent": "high"}}, "resource_usage.cpu_percent"),
    ({"type": "node_heartbeat", "resource_usage": {"mem_percent": 140}}, "resource_usage.mem_percent"),
    ({"type": "node_heartbeat", "installed_models": [{"model_id": "w", "status": "warm"}]},
     "installed_models.0.status"),
    ({"type": "job_result", "job_id": "j", "attempt": 0, "success": True}, "attempt"),
])
def test_invalid_frames_get_an_error_naming_the_field_and_change_nothing(
        web: WebServer, nodes: Any, r: redis.Redis, frame: Any, names: str) -> None:
    node = ready_node(nodes, web)  # its last frame read: what the heartbeats did is done
    before = records(r)
    node.send(frame)
    error = node.expect("error")  # the frame handled
    assert error["code"] == "INVALID_MESSAGE" and names in error["message"]
    assert records(r) == before
    node.heartbeat({"whisper": "ready"})  # the session survived
    wait_for(lambda: r.hget(Keys().node(node.node_id), "consecutive_ok") == "1", what="next heartbeat recorded")


def test_a_node_speaks_only_for_itself(web: WebServer, nodes: Any, r: redis.Redis) -> None:
    node = ready_node(nodes, web)
    other = nodes(web)
    other.register()
    node.heartbeat({"whisper": "error"}, node_id=other.node_id)
    error = node.expect("error")
    assert error["code"] == "NODE_ID_MISMATCH" and other.node_id in error["message"]
    assert r.hget(Keys().node(other.node_id), "last_heartbeat_ms") is None
    node.send({"type": "node_register", "node_id": other.node_id})
    assert node.expect("error")["code"] == "NODE_ID_MISMATCH"


def test_oversized_frame_gets_an_error_then_close_1009(web: WebServer, nodes: Any, r: redis.Redis) -> None:
    node = ready_node(nodes, web)
    node.send("x" * (1024 * 1024 + 1))
    assert node.expect("error")["code"] == "MESSAGE_TOO_LARGE"
    assert node.closed_with() == 1009
    wait_for(lambda: r.hget(Keys().node(node.node_id), "status") == "offline", what="offline after close")


def test_oversized_in_bytes_but_not_in_characters(web: WebServer, nodes: Any) -> None:
    node = ready_node(nodes, web)
    node.send(json.dumps({"type": "node_heartbeat", "pad": "é" * (600 * 1024)}, ensure_ascii=False))  # 1.2 MB
    error = node.expect("error")
    assert error["code"] == "MESSAGE_TOO_LARGE" and "1228" in error["message"]
    assert node.closed_with() == 1009
    assert [f["type"] for f in node.seen].count("error") == 1


def test_a_flood_of_frames_is_rate_limited(start_web: Any, nodes: Any) -> None:
    server = start_web(required_models=["whisper"], max_messages_per_second=10)
    node = ready_node(nodes, server)
    for _ in range(60):
        node.heartbeat({"whisper": "ready"})
    error = node.expect("error", code="RATE_LIMITED")
    assert "more than 10 frames per second" in error["message"]
    wait_for(lambda: '"event": "frames_rate_limited"' in server.process.log(), what="the drop logged")


def test_known_id_without_secret_conflicts_and_the_owner_carries_on(web: WebServer, nodes: Any,
                                                                      r: redis.Redis) -> None:
    owner = ready_node(nodes, web)
    intruder = nodes(web)
    intruder.send({"type": "node_register", "node_id": owner.node_id})
    error = intruder.expect("error")
    assert error == {"type": "error", "code": "NODE_ID_CONFLICT", "ref_type": "node_register",
                     "message": "node_id conflict: clear the local node_id and register again"}
    owner.heartbeat({"whisper": "error"})
    wait_for(lambda: r.hget(Keys().node(owner.node_id), "consecutive_fail") == "1", what="owner still heard")


def test_resume_on_another_web_process_closes_the_older_session(web: WebServer, start_web: Any, nodes: Any,
                                                                 r: redis.Redis) -> None:
    first = ready_node(nodes, web)
    other_web = start_web(required_models=["whisper"])
    second = nodes(other_web)
    ack = second.register(node_id=first.node_id, node_secret=first.secret)
    assert (ack["node_id"], ack["node_secret"], ack["status"]) == (first.node_id, first.secret, "registering")
    assert first.closed_with() == 4001
    # The old session's close handling must not take the resumed node offline: once it is done
    # (its web process logs the session's end), the node is still the new session's.
    assert web.process is not None
    ended = wait_for(lambda: log_events(web.process, "session_ended", node_id=first.node_id),
                     what="the superseded session's end handled")
    assert [e["outcome"] for e in ended] == ["ignored"]
    node = r.hgetall(Keys().node(first.node_id))
    assert node["status"] == "registering" and node["web_id"].split(":")[1] != ""
    second.heartbeat({"whisper": "ready"})
    wait_for(lambda: r.hget(Keys().node(first.node_id), "consecutive_ok") == "1", what="resumed session heard")


def test_a_status_change_made_by_the_scan_elsewhere_reaches_the_node(web: WebServer, nodes: Any, registry: Registry,
                                                                     r: redis.Redis) -> None:
    node = ready_node(nodes, web)
    registry.scan(now=int(time.time() * 1000) + 46_000)  # this test process plays the beat scan
    offline = node.expect("node_status", status="offline")
    assert offline["previous_status"] == "ready" and offline["reason"].startswith("no heartbeat for")
    assert node.closed_with() == 4002, "an offline node is told to register again"


def test_status_is_reported_periodically(web: WebServer, nodes: Any) -> None:
    node = ready_node(nodes, web)
    reports = [node.expect("node_status", timeout_s=3) for _ in range(2)]
    for report in reports:
        assert report["status"] == "ready" and report["previous_status"] == "registering"
        # No heartbeat since the transition, which started a fresh count: the last check passed.
        assert (report["health"]["consecutive_ok"], report["health"]["last_healthy"]) == (0, True)
        assert report["assigned_jobs"] == []


def test_periodic_reports_say_so(web: WebServer, nodes: Any) -> None:
    node = ready_node(nodes, web)
    report = node.expect("node_status", timeout_s=3, periodic=True, status="ready")
    assert report["health"]["window"] == "", "a transition starts a fresh window"
    node.heartbeat({"whisper": "ready"})
    node.heartbeat({"whisper": "loading"})
    wait_for(lambda: node.expect("node_status", timeout_s=3, periodic=True)["health"]["window"] == "10",
             what="a report with both checks")


def test_transitions_say_they_are_not_periodic(web: WebServer, nodes: Any) -> None:
    node = ready_node(nodes, web)
    transitions = [f for f in node.seen if f["type"] == "node_status"]
    assert [(f["status"], f.get("periodic")) for f in transitions] == [("registering", False), ("ready", False)]


def test_integral_numbers_are_sent_as_integers(web: WebServer, nodes: Any) -> None:
    node = ready_node(nodes, web)
    node.expect("node_status", timeout_s=3, periodic=True)
    node.send({"type": "node_heartbeat", "resource_usage": {"cpu_percent": 101}})
    node.send({"type": "job_ack", "job_id": "j-1", "attempt": 1, "node_id": "someone-else"})
    node.send({"type": "node_teleport"})
    node.send({"type": "node_drain", "reason": "bye", "deadline_seconds": 30.0})
    node.expect("node_status", status="offline")
    kinds = {json.loads(text)["type"] for text in node.raw}
    assert kinds >= {"node_register_ack", "node_status", "error"}
    assert [(text, floats) for text in node.raw if (floats := integral_floats(text))] == []
    assert '"heartbeat_interval_seconds":15,"heartbeat_timeout_seconds":45}' in node.raw[0]


def test_closing_the_session_takes_the_node_offline(web: WebServer, nodes: Any, r: redis.Redis) -> None:
    node = ready_node(nodes, web)
    node.close()
    wait_for(lambda: r.hget(Keys().node(node.node_id), "status") == "offline", what="offline")
    assert r.hget(Keys().node(node.node_id), "status_reason") == "session closed"
    assert_consistent(r, Keys())


def test_the_node_can_ask_to_be_drained(web: WebServer, nodes: Any, r: redis.Redis) -> None:
    node = ready_node(nodes, web)
    node.send({"type": "node_drain", "reason": "shutting down"})
    draining = node.expect("node_status", status="draining")
    assert draining["reason"] == f"drain requested by node {node.node_id}: shutting down"
    offline = node.expect("node_status", status="offline")
    assert offline["reason"] == "drained: no jobs were assigned"
    node.heartbeat({"whisper": "ready"})  # a drained node keeps its session, idle
    node.send({"type": "node_drain"})
    error = node.expect("error")  # handled after the heartbeat: frames are handled in order
    assert (error["code"], error["ref_type"]) == ("INVALID_MESSAGE", "node_drain")
    assert [f for f in node.seen if f["type"] == "error"] == [error], "the heartbeat was taken without a word"


def test_registration_tokens_refuse_with_1008(start_web: Any, nodes: Any, r: redis.Redis) -> None:
    guarded = start_web(registration_tokens=["s3cret"])
    node = nodes(guarded)
    node.send({"type": "node_register", "registration_token": "guess"})
    error = node.expect("error")
    assert (error["code"], error["ref_type"]) == ("UNAUTHORIZED", "node_register")
    assert node.closed_with() == 1008
    assert r.zcard(Keys().nodes()) == 0
    assert nodes(guarded).register(registration_token="s3cret")["status"] == "registering"
    assert "open_registration" not in guarded.process.log()


def test_redis_restart_mid_session(tmp_path: Path, logs_dir: Path, nodes: Any) -> None:
    """Redis goes away: frames get INTERNAL_ERROR and the session stays; Redis comes back
    (same port, its AOF replayed) and the session carries on."""
    store = LocalRedis(tmp_path / "redis", append_only=True).start()
    server = WebServer(store.url, logs_dir, require_gpu=False, required_models=["whisper"]).start()
    try:
        node = ready_node(nodes, server)
        store.kill()
        node.heartbeat({"whisper": "ready"})
        error = node.expect("error", timeout_s=30)
        assert error["code"] == "INTERNAL_ERROR" and error["ref_type"] == "node_heartbeat"
        store.start()
        client = redis.Redis.from_url(store.url, decode_responses=True)
        assert client.hget(Keys().node(node.node_id), "status") == "ready", "AOF kept the node"
        node.heartbeat({"whisper": "error"})
        wait_for(lambda: client.hget(Keys().node(node.node_id), "consecutive_fail") == "1", timeout_s=20,
                 what="heartbeat recorded after the restart")
    finally:
        server.stop()
        store.stop()


def test_the_web_process_logs_json_events(web: WebServer, nodes: Any) -> None:
    node = ready_node(nodes, web)
    intruder = nodes(web)
    intruder.send({"type": "node_register", "node_id": node.node_id})
    intruder.expect("error")
    node.heartbeat({"whisper": "error"})

    def logged() -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for line in web.process.log().splitlines():
            record = json.loads(line)  # every line is JSON
            if record.get("node_id") == node.node_id:
                found.setdefault(record.get("event", ""), []).append(record)
        return found
    events = wait_for(lambda: (e := logged()).get("health_check") and len(e["health_check"]) >= 2 and e,
                      what="health check logged")
    assert events["registration_ok"][0]["resumed"] is False
    assert events["registration_conflict"][0]["level"] == "WARNING"
    transition = events["status_transition"][-1]
    assert (transition["from_status"], transition["to_status"]) == ("registering", "ready")
    assert transition["reason"] == "3 consecutive healthy heartbeats"
    assert events["health_check"][-1]["healthy"] is False


def test_a_stopping_web_process_closes_its_sessions_so_nodes_reconnect(start_web: Any, nodes: Any,
                                                                       r: redis.Redis) -> None:
    server = start_web(required_models=["whisper"])
    node = ready_node(nodes, server)
    started = time.monotonic()
    server.stop()  # SIGTERM, as a platform restarting the process sends
    assert node.closed_with() == 1012
    assert time.monotonic() - started < 5, "the process did not wait out its graceful timeout"
    assert r.hget(Keys().node(node.node_id), "status") == "offline"
