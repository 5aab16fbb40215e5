"""Fuzzing the node protocol against the real web process: malformed, truncated,
oversized, wrongly typed and out-of-order frames, and valid frames for other
nodes and their jobs, from registered and unregistered sessions. Only errors
come back, nothing crashes, an honest node and its job are untouched, and every
record still agrees with its indexes. (bench/fuzz.py sends 100,000.)"""

from __future__ import annotations

import json
import random
from typing import Any

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from dispatcher.jobs import Jobs
from dispatcher.keys import Keys
from tests.fuzzing import Targets, check_answer, check_log, check_records, random_frame
from tests.support import NodeClient, WebServer, client_app, wait_for


def answers(session: NodeClient, quiet_s: float = 0.3) -> tuple[list[dict[str, Any]], int | None]:
    """Everything the server sends until it has been quiet for ``quiet_s``, and its close code."""
    got = []
    try:
        while True:
            got.append(json.loads(session.ws.recv(timeout=quiet_s)))
    except TimeoutError:
        return got, None
    except ConnectionClosed as closed:
        return got, closed.rcvd.code if closed.rcvd else None


def test_fuzzed_frames_get_errors_only_and_hurt_nobody(web: WebServer, nodes: Any, r: redis.Redis,
                                                       make_settings: Any, db_url: str) -> None:
    honest = nodes(web)
    honest.register(installed_models=[{"model_id": "whisper", "status": "ready"}], max_concurrent_jobs=2)
    for _ in range(3):
        honest.heartbeat({"whisper": "ready"})
    honest.expect("node_status", status="ready")
    jobs = Jobs(r, make_settings(required_models=["whisper"]), client_app(db_url))
    jobs.submit("honest-job", {"job_type": "asr", "required_models": ["whisper"]})
    honest.expect("job_assign", job_id="honest-job")
    targets = Targets(node_ids=[honest.node_id], jobs=[("honest-job", 1)])
    keys = Keys()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(rng=st.randoms(use_true_random=False), registered=st.booleans(), count=st.integers(1, 25))
    def fuzz(rng: random.Random, registered: bool, count: int) -> None:
        session = NodeClient(web.ws_url)
        try:
            if registered:
                session.register()
            # Drawn before any is sent: a session the server closes early must not change what
            # the example draws (hypothesis replays examples and checks they draw the same).
            frames = [random_frame(rng, session.node_id, targets) for _ in range(count)]
            for frame in frames:
                session.ws.send(frame)
            got, close_code = answers(session)
        except ConnectionClosed as closed:  # closed while we were still sending
            got, close_code = [], closed.rcvd.code if closed.rcvd else None
        finally:
            session.close()
        assert [problem for frame in got if (problem := check_answer(frame))] == []
        assert close_code in (None, 1008, 1009), close_code
        state, on, attempt = r.hmget(keys.job("honest-job"), "state", "node_id", "attempt")
        assert (state, on, attempt) == ("assigned", honest.node_id, "1"), "the honest node's job is untouched"
        assert r.hget(keys.node(honest.node_id), "status") == "ready"

    fuzz()
    honest.heartbeat({"whisper": "ready"})
    before = int(r.hget(keys.node(honest.node_id), "consecutive_ok") or 0)
    honest.heartbeat({"whisper": "ready"})
    wait_for(lambda: int(r.hget(keys.node(honest.node_id), "consecutive_ok") or 0) > before,
             what="the honest node's session still served")
    # Every node a fuzz session registered went offline with its session (the honest one aside):
    # no close is still being handled while the records are read.
    wait_for(lambda: all(r.hget(keys.node(node_id), "connected") == "0"
                         for node_id in r.zrange(keys.nodes(), 0, -1) if node_id != honest.node_id),
             what="the fuzz sessions' closes handled")
    assert check_records(r, keys) == []
    assert web.process is not None and check_log(web.process.log()) == []
