"""The reference node agent, as a real process, against the real web process."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path
from typing import Any

import pytest
import redis

from dispatcher.keys import Keys
from tests.support import log_events, wait_for

FAST = {"heartbeat_interval_seconds": 0.2, "heartbeat_timeout_seconds": 3, "required_models": ["whisper"]}


def journal_end(path: Path, job_id: str, attempt: int) -> dict[str, Any] | None:
    """The result an agent's journal recorded for the attempt once it ended (read only: the
    journal's own class rewrites the file it opens)."""
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written
        if (entry["event"], entry["job_id"], entry["attempt"]) == ("finished", job_id, attempt):
            return entry["result"]
    return None


def status_of(r: redis.Redis, node_id: str) -> str | None:
    return r.hget(Keys().node(node_id), "status")


def test_agent_registers_reports_real_usage_and_keeps_its_identity(start_web: Any, agents: Any, tmp_path: Path,
                                                                   r: redis.Redis) -> None:
    server = start_web(**FAST)
    state = tmp_path / "agent.json"
    agent = agents(server, state, "--label", "region=eu", "--max-concurrent-jobs", "2")
    identity = wait_for(lambda: state.exists() and json.loads(state.read_text()), what="state file")
    node_id = identity["node_id"]
    assert identity["node_secret"] and stat.S_IMODE(os.stat(state).st_mode) == 0o600
    wait_for(lambda: status_of(r, node_id) == "ready", what="agent ready")
    node = r.hgetall(Keys().node(node_id))
    assert float(node["mem_percent"]) > 0, "memory usage comes from psutil"
    assert json.loads(node["hardware"])["cpu_cores"] == os.cpu_count()
    assert (json.loads(node["labels"]), node["max_concurrent_jobs"]) == ({"region": "eu"}, "2")
    wait_for(lambda: any(e["status"] == "ready" for e in log_events(agent, "node_status")), what="status logged")

    agent.kill()
    wait_for(lambda: status_of(r, node_id) == "offline", what="offline after the agent died")
    again = agents(server, state)
    wait_for(lambda: status_of(r, node_id) == "ready", what="resumed agent ready")
    assert [e["node_id"] for e in log_events(again, "registered")] == [node_id]
    assert r.zcard(Keys().nodes()) == 1


def test_agent_reconnects_after_the_web_process_dies(start_web: Any, agents: Any, tmp_path: Path,
                                                     r: redis.Redis) -> None:
    server = start_web(**FAST)
    state = tmp_path / "agent.json"
    agents(server, state)
    node_id = wait_for(lambda: state.exists() and json.loads(state.read_text())["node_id"], what="registered")
    wait_for(lambda: status_of(r, node_id) == "ready", what="ready")
    old_web = r.hget(Keys().node(node_id), "web_id")
    server.kill()
    server.start()  # same port, new process
    wait_for(lambda: r.hget(Keys().node(node_id), "web_id") != old_web, timeout_s=20,
             what="agent resumed on the new web process")
    wait_for(lambda: status_of(r, node_id) == "ready", what="ready again")
    assert r.zcard(Keys().nodes()) == 1


def test_agent_away_for_many_tries_comes_back_within_a_heartbeat_interval(start_web: Any, agents: Any,
                                                                          tmp_path: Path, r: redis.Redis) -> None:
    """Its backoff never grows past the heartbeat interval the server gave it: a node that
    stayed away longer would find its jobs given to others (a chaos run saw one come back
    6.6 s after a 2 s Redis restart, just past the grace). Without the cap, the eighth try
    waits up to 30 s."""
    server = start_web(**FAST)
    state = tmp_path / "agent.json"
    agent = agents(server, state)
    node_id = wait_for(lambda: state.exists() and json.loads(state.read_text())["node_id"], what="registered")
    wait_for(lambda: status_of(r, node_id) == "ready", what="ready")
    old_web = r.hget(Keys().node(node_id), "web_id")
    server.kill()
    wait_for(lambda: len(log_events(agent, "reconnecting")) >= 8, timeout_s=10, what="eight tries refused")
    server.start()
    wait_for(lambda: r.hget(Keys().node(node_id), "web_id") != old_web, timeout_s=3,
             what="the agent back within a few heartbeat intervals of the web process")


def test_agent_logs_transitions_apart_from_the_periodic_reports(start_web: Any, agents: Any, tmp_path: Path) -> None:
    server = start_web(**FAST, status_report_interval_seconds=0.3)
    agent = agents(server, tmp_path / "agent.json", "--log-level", "debug")
    wait_for(lambda: [e["status"] for e in log_events(agent, "node_status_report")][-3:] == ["ready"] * 3,
             what="periodic reports of a ready node")
    transitions = [(e["previous_status"], e["status"]) for e in log_events(agent, "node_status")]
    assert transitions == [(None, "registering"), ("registering", "ready")], "a report is no transition"


def test_agent_takes_an_undrain_calmly(start_web: Any, agents: Any, tmp_path: Path, r: redis.Redis) -> None:
    """An undrain of a drained node closes its session so that it registers again: the
    agent logs that at INFO and comes back, with no warning."""
    server = start_web(**FAST)
    state = tmp_path / "agent.json"
    agent = agents(server, state)
    node_id = wait_for(lambda: state.exists() and json.loads(state.read_text())["node_id"], what="registered")
    wait_for(lambda: status_of(r, node_id) == "ready", what="ready")
    assert server.request("POST", f"/api/nodes/{node_id}/drain", {"reason": "swap"})[1]["status"] == "offline"
    assert server.request("DELETE", f"/api/nodes/{node_id}/drain")[1]["status"] == "offline"
    wait_for(lambda: len(log_events(agent, "registered")) == 2 and status_of(r, node_id) == "ready",
             what="registered again and ready")
    ended = log_events(agent, "session_ended")
    assert [e["level"] for e in ended] == ["INFO"] and "drain ended" in ended[0]["error"]
    assert not [line for line in agent.log().splitlines() if '"level": "WARNING"' in line]


def test_agent_with_a_refused_id_registers_anew(start_web: Any, agents: Any, tmp_path: Path, r: redis.Redis) -> None:
    server = start_web(**FAST)
    first_state = tmp_path / "first.json"
    agents(server, first_state)
    taken = wait_for(lambda: first_state.exists() and json.loads(first_state.read_text())["node_id"], what="first")
    stolen = tmp_path / "stolen.json"
    stolen.write_text(json.dumps({"node_id": taken, "node_secret": "not-the-secret"}))
    agent = agents(server, stolen)
    new_id = wait_for(lambda: (json.loads(stolen.read_text())["node_id"] or "") not in ("", taken)
                      and json.loads(stolen.read_text())["node_id"], what="a new id")
    assert new_id != taken and log_events(agent, "identity_cleared")
    wait_for(lambda: status_of(r, new_id) == "ready", what="new node ready")
    assert status_of(r, taken) == "ready", "the real owner was untouched"


def test_agent_stops_on_a_refused_token(start_web: Any, agents: Any, tmp_path: Path) -> None:
    server = start_web(registration_tokens=["right"], **FAST)
    agent = agents(server, tmp_path / "a.json", "--registration-token", "wrong")
    assert agent.popen.wait(20) == 3
    assert "registration refused" in agent.log()


def test_agent_drains_itself_on_sigterm(start_web: Any, agents: Any, tmp_path: Path, r: redis.Redis) -> None:
    server = start_web(**FAST)
    state = tmp_path / "agent.json"
    agent = agents(server, state)
    node_id = wait_for(lambda: state.exists() and json.loads(state.read_text())["node_id"], what="registered")
    wait_for(lambda: any(e["status"] == "ready" for e in log_events(agent, "node_status")),
             what="agent knows it is ready")
    agent.signal(signal.SIGTERM)
    assert agent.popen.wait(20) == 0
    node = r.hgetall(Keys().node(node_id))
    assert node["status"] == "offline" and node["drain_requested_by"] == f"node {node_id}"


def test_agent_runs_jobs_through_its_handler(system: Any, client: Any, agents: Any, tmp_path: Path,
                                            r: redis.Redis) -> None:
    agent = agents(system.web, tmp_path / "a.json", "--max-concurrent-jobs", "2",
                   "--handler", "dispatcher.agent.handlers:demo")
    wait_for(lambda: r.scard(Keys().status_set("ready")) == 1, what="ready")
    echo = client.send_task("dispatcher.submit_job", kwargs={"job_type": "echo", "payload": {"x": [1, {}]}})
    slow = client.send_task("dispatcher.submit_job", kwargs={"job_type": "sleep", "payload": {"seconds": 1.5}})
    assert echo.get(timeout=10) == {"x": [1, {}]}
    wait_for(lambda: (slow.info or {}).get("progress", 0) > 0, what="progress from the handler")
    assert slow.info["node_id"] == json.loads((tmp_path / "a.json").read_text())["node_id"]
    assert slow.get(timeout=10)["slept_seconds"] == 1.5
    broken = client.send_task("dispatcher.submit_job", kwargs={"job_type": "fail", "max_attempts": 2,
                                                               "payload": {"code": "OOM", "message": "no memory"}})
    with pytest.raises(Exception, match="OOM: no memory"):
        broken.get(timeout=15)
    assert [e["attempt"] for e in log_events(agent, "job_started") if e["job_id"] == broken.id] == [1, 2]


def test_agent_stops_a_cancelled_job(system: Any, client: Any, agents: Any, tmp_path: Path, r: redis.Redis) -> None:
    from celery.exceptions import TaskRevokedError

    agent = agents(system.web, tmp_path / "a.json")
    wait_for(lambda: r.scard(Keys().status_set("ready")) == 1, what="ready")
    job = client.send_task("dispatcher.submit_job", kwargs={"job_type": "sleep", "payload": {"seconds": 30}})
    wait_for(lambda: job.state == "STARTED", what="started")
    client.send_task("dispatcher.cancel_job", kwargs={"job_id": job.id}).get(timeout=10)
    with pytest.raises(TaskRevokedError):
        job.get(timeout=10)
    wait_for(lambda: log_events(agent, "job_cancelled"), what="the agent told")
    wait_for(lambda: r.hlen(Keys().assigned(json.loads((tmp_path / "a.json").read_text())["node_id"])) == 0,
             what="slot free")
    # The handler stopped, 30 s early: the attempt's end is in the agent's journal, as cancelled.
    ended = wait_for(lambda: journal_end(tmp_path / "a.json.jobs", job.id, 1), 10, 0.1,
                     what="the attempt ended on the node")
    assert ended["error"]["code"] == "CANCELLED"
    assert not log_events(agent, "job_finished", job_id=job.id), "no result sent for a cancelled job"


def test_runner_dedups_redelivered_jobs_and_enforces_its_capacity() -> None:
    import threading

    from dispatcher.agent.runner import JobRunner
    from dispatcher.messages import JobAssign

    sent: list[dict[str, Any]] = []
    release = threading.Event()

    def handler(job: dict[str, Any], ctx: Any) -> Any:
        release.wait(5)
        return job["payload"]
    runner = JobRunner(handler, max_concurrent_jobs=1, send=sent.append)
    first = JobAssign(job_id="j1", attempt=1, job_type="t", payload={"n": 1})
    runner.assign(first)
    runner.assign(first)  # delivered again while running: acknowledged again, not run twice
    runner.assign(JobAssign(job_id="j2", attempt=1, job_type="t"))  # over capacity
    release.set()
    assert runner.wait_idle(5)
    runner.assign(first)  # delivered again after it finished: its result is sent again
    kinds = [(f["type"], f["job_id"], f.get("success"), (f.get("error") or {}).get("code")) for f in sent]
    assert kinds.count(("job_ack", "j1", None, None)) == 2
    assert ("job_result", "j2", False, "NODE_AT_CAPACITY") in kinds
    assert kinds.count(("job_result", "j1", True, None)) == 2
    assert next(f for f in sent if f["type"] == "job_result" and f["job_id"] == "j1")["output"] == {"n": 1}


def test_a_restarted_runner_never_runs_an_attempt_twice(tmp_path: Path) -> None:
    """What the journal on disk tells a new process: a finished attempt's result is
    sent again; one its crash cut short is reported failed (retryable: the server
    runs the job again as a new attempt), and neither runs again."""
    import threading

    from dispatcher.agent.journal import JobJournal
    from dispatcher.agent.runner import JobRunner
    from dispatcher.messages import JobAssign

    runs: list[str] = []
    release = threading.Event()

    def handler(job: dict[str, Any], ctx: Any) -> Any:
        runs.append(job["job_id"])
        if job["job_id"] == "cut-short":
            release.wait(5)
        return {"done": job["job_id"]}
    path = tmp_path / "agent.json.jobs"
    first = JobRunner(handler, 2, lambda frame: None, JobJournal(path))
    first.assign(JobAssign(job_id="finished", attempt=1, job_type="t"))
    first.assign(JobAssign(job_id="cut-short", attempt=1, job_type="t"))
    wait_for(lambda: runs == ["finished", "cut-short"] or sorted(runs) == ["cut-short", "finished"], what="both run")
    wait_for(lambda: ("finished", 1) in JobJournal(path).finished, what="the first on disk")

    sent: list[dict[str, Any]] = []  # a new process, as after a crash (the first never finishes cut-short)
    second = JobRunner(handler, 2, sent.append, JobJournal(path))
    second.assign(JobAssign(job_id="finished", attempt=1, job_type="t"))
    second.assign(JobAssign(job_id="cut-short", attempt=1, job_type="t"))
    second.assign(JobAssign(job_id="cut-short", attempt=2, job_type="t"))  # the server's new attempt runs
    release.set()
    assert second.wait_idle(5)
    results = {(f["job_id"], f["attempt"]): f for f in sent if f["type"] == "job_result"}
    assert results[("finished", 1)]["output"] == {"done": "finished"}
    assert results[("cut-short", 1)]["error"]["code"] == "NODE_RESTARTED"
    assert results[("cut-short", 1)]["error"]["retryable"] is True
    assert results[("cut-short", 2)]["success"] is True
    assert sorted(runs) == ["cut-short", "cut-short", "finished"], "attempt 1 of each ran once, attempt 2 once"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_runner_marks_the_nodes_own_failures_as_node_faults() -> None:
    from dispatcher.agent.runner import JobFailed, JobRunner
    from dispatcher.messages import JobAssign

    class OutOfMemoryError(RuntimeError):  # as torch.cuda.OutOfMemoryError is named
        pass

    raised = {
        "crashed": JobFailed("MODEL_CRASHED", "the model crashed", retryable=True),
        "bad-input": JobFailed("BAD_AUDIO", "not a WAV file"),
        "said-so": JobFailed("WEIRD", "the operator's handler knows", node_fault=True),
        "not-mine": JobFailed("CUDA_ERROR", "a job that asks too much", node_fault=False),
        "cuda": RuntimeError("CUDA error: an illegal memory access was encountered"),
        "torch-oom": OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        "oom": MemoryError(),
        "bug": KeyError("payload"),
    }

    def handler(job: dict[str, Any], ctx: Any) -> Any:
        raise raised[job["job_id"]]
    sent: list[dict[str, Any]] = []
    runner = JobRunner(handler, max_concurrent_jobs=1, send=sent.append)
    for job_id in raised:
        runner.assign(JobAssign(job_id=job_id, attempt=1, job_type="t"))
        assert runner.wait_idle(5)
    errors = {f["job_id"]: f["error"] for f in sent if f["type"] == "job_result"}
    assert {job_id: (e["code"], e.get("node_fault", False)) for job_id, e in errors.items()} == {
        "crashed": ("MODEL_CRASHED", True), "bad-input": ("BAD_AUDIO", False), "said-so": ("WEIRD", True),
        "not-mine": ("CUDA_ERROR", False), "cuda": ("CUDA_ERROR", True), "torch-oom": ("OUT_OF_MEMORY", True),
        "oom": ("OUT_OF_MEMORY", True), "bug": ("HANDLER_ERROR", False)}
