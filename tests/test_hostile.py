"""Hostile and broken peers against the real web process: what a client without a
token can cost is bounded, one peer that stops reading stalls nobody, and a bad
record never takes down a view."""

from __future__ import annotations

import errno
import json
import socket
import time
import urllib.request
from typing import Any

import pytest
import redis

from dispatcher.jobs import Jobs
from dispatcher.keys import Keys
from tests.support import RawSocket, WebServer, client_app, ready_node, wait_for, web_worker_rss


def flood_without_reading(port: int, seconds: float, frame: bytes) -> tuple[int, bool]:
    """Send ``frame`` again and again for up to ``seconds`` without ever reading:
    (bytes the server took, whether it cut the connection)."""
    peer = RawSocket(port, receive_buffer=4096)
    assert peer.status == 101
    peer.sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                sent += peer.sock.send(frame)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError as exc:
                assert exc.errno in (errno.EPIPE, errno.ECONNRESET), exc
                return sent, True
        return sent, False
    finally:
        peer.close()


def test_a_peer_that_sends_and_never_reads_is_slowed_by_tcp_and_cut_off(start_web: Any) -> None:
    """Each frame earns an error frame (NOT_REGISTERED) the peer never reads. The
    server reads the next frame only after answering the last, so the peer can push
    little more than the sockets' buffers; the answers pile up to a bound, and the
    peer is cut off instead of being waited for."""
    server = start_web(max_messages_per_second=1_000_000, ws_send_timeout_seconds=2)
    rss_before = web_worker_rss(server)
    sent, cut = flood_without_reading(server.port, 12, RawSocket.frame('{"type": "node_heartbeat"}') * 64)
    assert cut, "the server cut the peer that does not read"
    assert sent < 32 * 1024 * 1024, f"the server read {sent} bytes from a peer that never read"
    assert web_worker_rss(server) - rss_before < 64 * 1024 * 1024
    with urllib.request.urlopen(f"{server.url}/healthz", timeout=2) as response:
        assert response.status == 200


def test_one_stuck_session_stalls_nobody(start_web: Any, nodes: Any, make_settings: Any, r: redis.Redis,
                                         db_url: str) -> None:
    """A node that stops reading while big job_assign frames are sent to it holds
    nothing shared: an honest node keeps getting its periodic node_status, and a
    takeover closes the stuck session although it cannot even take its close frame."""
    settings = {"status_report_interval_seconds": 0.5, "ws_send_timeout_seconds": 60}
    server = start_web(**settings)
    stuck = RawSocket(server.port, receive_buffer=4096)
    stuck.send({"type": "node_register", "max_concurrent_jobs": 20})
    ack = stuck.recv_json()
    for _ in range(3):
        stuck.send({"type": "node_heartbeat", "resource_usage": {"cpu_percent": 1, "mem_percent": 1}})
    wait_for(lambda: r.sismember(Keys().status_set("ready"), ack["node_id"]), what="stuck node ready")

    jobs = Jobs(r, make_settings(**settings), client_app(db_url))
    for i in range(12):  # 12 x 900 KB: far more than the sockets hold
        jobs.submit(f"big-{i}", {"job_type": "t", "payload": {"blob": "x" * 900_000}})
    # The stuck session's writer took a 900 KB frame off the node's queue: it is in a send
    # that cannot end, the peer's window (4 KB) closed.
    wait_for(lambda: r.llen(Keys().queue(ack["node_id"])) < 12, what="the stuck session's writer sending")
    honest = nodes(server)
    honest.register()
    honest.seen.clear()
    wait_for(lambda: [honest.expect("node_status", 2) for _ in range(3)], 6, what="periodic reports")

    takeover = nodes(server)
    takeover.send({"type": "node_register", "node_id": ack["node_id"], "node_secret": ack["node_secret"]})
    assert takeover.expect("node_register_ack")["node_id"] == ack["node_id"]
    started = time.monotonic()
    stuck.sock.settimeout(10)
    try:
        while stuck.sock.recv(1 << 20):  # drain what was sent until the cut
            pass
    except OSError:
        pass
    assert time.monotonic() - started < 9, "the stuck session was cut after the close grace"
    stuck.close()


def test_a_session_that_never_registers_is_closed(start_web: Any) -> None:
    server = start_web(registration_timeout_seconds=1)
    idle = RawSocket(server.port)
    assert idle.status == 101
    started = time.monotonic()
    assert idle.close_code(6) == 1008
    assert 0.9 < time.monotonic() - started < 4


def test_unregistered_sessions_are_capped_per_address_and_per_process(start_web: Any, nodes: Any) -> None:
    """Per address, past the cap, a new session is refused. Per process, past the cap,
    the address holding the most makes room for a newcomer from an address holding at
    least two fewer (else a few addresses could keep every honest node out), and is
    refused otherwise (so attackers cannot make the process accept as fast as they
    reconnect)."""
    server = start_web(max_unregistered_sessions=5, max_unregistered_sessions_per_address=3)
    held = [RawSocket(server.port) for _ in range(3)]
    assert [s.status for s in held] == [101] * 3
    assert RawSocket(server.port).status == 503, "a fourth from the same address waits"
    held[0].send({"type": "node_register"})
    held[0].recv_json()
    again = RawSocket(server.port)
    assert again.status == 101, "a registered session frees its place"
    held += [again, RawSocket(server.port, source="127.0.0.2"), RawSocket(server.port, source="127.0.0.2")]
    assert [s.status for s in held[3:]] == [101, 101, 101], "five wait to register: the most"
    assert RawSocket(server.port, source="127.0.0.2").status == 503, "no room taken from an address as full"
    newcomer = RawSocket(server.port, source="127.0.0.4")
    assert newcomer.status == 101, "the fullest address (127.0.0.1, 3 waiting) made room"
    assert held[1].close_code() == 1008, "its longest-waiting session was closed"
    newcomer.send({"type": "node_register"})
    assert newcomer.recv_json()["type"] == "node_register_ack"
    for s in (*held, newcomer):
        s.close()


def test_healthz_answers_while_the_process_holds_its_most_sessions(start_web: Any, nodes: Any) -> None:
    server = start_web(web_worker_connections=30, http_connections_reserved=5)
    held = []
    for _ in range(25):
        node = nodes(server)
        node.register()
        held.append(node)
    assert RawSocket(server.port).status == 503
    started = time.monotonic()
    with urllib.request.urlopen(f"{server.url}/healthz", timeout=3) as response:
        assert response.status == 200 and json.loads(response.read())["sessions"] == 25
    assert time.monotonic() - started < 2


def test_a_browser_origin_must_be_allowed(start_web: Any) -> None:
    server = start_web(allowed_origins=["https://ops.example"])
    assert RawSocket(server.port, origin="https://evil.example").status == 403
    assert RawSocket(server.port, origin="https://ops.example").status == 101
    assert RawSocket(server.port).status == 101, "agents send no Origin"


def test_no_origin_is_allowed_by_default(web: WebServer) -> None:
    assert RawSocket(web.port, origin=f"http://127.0.0.1:{web.port}").status == 403


def test_compression_is_never_negotiated(web: WebServer) -> None:
    raw = socket.create_connection(("127.0.0.1", web.port))
    raw.sendall(b"GET /ws/node HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n")
    head = raw.recv(4096).lower()
    raw.close()
    assert head.startswith(b"http/1.1 101") and b"sec-websocket-extensions" not in head


@pytest.mark.parametrize("usage", [{"running_jobs": 10**17}, {"running_jobs": -1}, {"cpu_percent": 101},
                                   {"gpu_percent": -0.5}])
def test_numbers_out_of_bounds_are_refused(web: WebServer, nodes: Any, usage: dict[str, Any]) -> None:
    node = nodes(web)
    node.register()
    node.send({"type": "node_heartbeat", "resource_usage": usage})
    error = node.expect("error")
    assert error["code"] == "INVALID_MESSAGE" and next(iter(usage)) in error["message"]


def test_every_view_survives_a_corrupt_record(web: WebServer, nodes: Any, r: redis.Redis) -> None:
    """Whatever a record holds (an older version's, an operator's HSET), views answer."""
    node = nodes(web)
    node.register()
    node.send({"type": "node_heartbeat", "resource_usage": {"cpu_percent": 1}})
    node.sync()  # the heartbeat recorded: it cannot write over what follows
    r.hset(Keys().node(node.node_id), mapping={
        "running_jobs": "1e+17", "cpu_percent": "NaN", "max_concurrent_jobs": "abc", "models": "{not json",
        "labels": "[1, 2]", "status_since_ms": "soon", "status": "sideways", "hardware": "null"})
    for path in ("/api/nodes", f"/api/nodes/{node.node_id}", "/api/nodes?status=ready", "/api/stats", "/metrics"):
        status, body = web.get(path)
        assert status == 200, (path, body)
    status, body = web.get(f"/api/nodes/{node.node_id}")
    assert body["resource_usage"]["running_jobs"] == 10**17 and body["resource_usage"]["cpu_percent"] is None
    # The ticker carries on for the others: another node gets its periodic reports, three of them,
    # a second's worth of ticks (a report every 0.5 s here) that each had the corrupt record to read.
    other = ready_node(nodes, web)
    for _ in range(3):
        other.expect("node_status", periodic=True)
    assert '"event": "hub_tick_crashed"' not in web.process.log()


@pytest.mark.parametrize(("path", "status"), [
    ("/api/transitions?limit=abc", 400), ("/api/transitions?limit=0", 400), ("/api/nodes?limit=5000", 400),
    ("/api/nodes?status=sideways", 400), ("/api/nodes?cursor=a%20b", 400),
    ("/api/nodes/n-1:queue", 404), ("/api/jobs/j:attempts", 404), ("/api/nodes/x/eligibility?job=a:b", 404),
    ("/api/no-such-thing", 404), ("/api/nodes/n-1/drain", 405),
])
def test_bad_queries_and_paths_get_a_json_error(web: WebServer, path: str, status: int) -> None:
    got, body = web.get(path)
    assert got == status and isinstance(body, dict) and body["error"], (path, got, body)


def test_answers_carry_security_headers(web: WebServer) -> None:
    for path in ("/", "/api/nodes", "/healthz"):
        with urllib.request.urlopen(f"{web.url}{path}", timeout=5) as response:
            headers = response.headers
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    with urllib.request.urlopen(f"{web.url}/", timeout=5) as response:
        policy = response.headers["Content-Security-Policy"]
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]


def test_nodes_are_listed_by_pages(web: WebServer, nodes: Any) -> None:
    ids = []
    for i in range(7):
        node = nodes(web)
        node.register(node_id=f"page-{i}")
        ids.append(node.node_id)
    seen, cursor = [], None
    while True:
        status, body = web.get("/api/nodes?limit=3" + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200 and len(body["nodes"]) <= 3
        seen += [n["node_id"] for n in body["nodes"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sorted(ids) == [n for n in seen if n.startswith("page-")] and len(seen) == len(set(seen))
    status, body = web.get("/api/nodes?status=registering&limit=2")
    assert all(n["status"] == "registering" for n in body["nodes"]) and body["next_cursor"]


def test_what_a_peer_chooses_is_never_logged_or_echoed_at_length(start_web: Any) -> None:
    server = start_web(registration_tokens=["t"])
    peer = RawSocket(server.port)
    peer.send({"type": "node_register", "node_id": "n" * 100_000, "registration_token": "wrong"})
    error = peer.recv_json()
    assert error["code"] == "INVALID_MESSAGE" and len(error["message"]) < 300
    peer.send({"type": "node_register", "registration_token": "w" * 100_000})
    assert peer.recv_json()["code"] == "INVALID_MESSAGE"
    peer.send({"type": "node_register", "version": "v" * 100, "registration_token": "wrong"})
    assert peer.recv_json()["code"] == "UNAUTHORIZED"
    assert RawSocket(server.port, origin="o" * 5000).status == 403
    assert server.process is not None
    wait_for(lambda: '"event": "sessions_refused"' in server.process.log(), what="refusals logged (in sums)")
    log = server.process.log()
    assert '"event": "registration_failed"' in log and '"event": "sessions_refused"' in log
    assert max(len(line) for line in log.splitlines()) < 3000


def test_a_page_of_large_records_is_cut_short_not_sent_whole(web: WebServer, nodes: Any) -> None:
    """One token holder registers nodes as large as a record may be: a page stops at
    its byte budget and the next page carries on where it stopped."""
    models = [{"model_id": f"m{i:03d}-" + "x" * 120, "status": "ready"} for i in range(250)]
    ids = set()
    for i in range(80):
        node = nodes(web)
        node.register(node_id=f"big-{i:02d}", installed_models=models)
        ids.add(node.node_id)
        node.close()
    seen, cursor, pages = [], None, 0
    while True:
        status, body = web.get("/api/nodes?limit=100" + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200
        pages += 1
        seen += [n["node_id"] for n in body["nodes"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages >= 2 and ids <= set(seen) and len(seen) == len(set(seen))
