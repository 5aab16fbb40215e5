"""The dispatcher command, as a person runs it: real processes, real output."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from dispatcher.cli import EXIT_FAILED, Api, follow
from dispatcher.errors import NoEligibleNode
from dispatcher.keys import Keys
from tests.support import PYTHON, clean_env, cli_env, run_cli, wait_for


def test_nodes_and_node(system: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"whisper": "ready"}, labels={"zone": "eu"}, max_concurrent_jobs=2).wait_ready()
    listing = run_cli(system, "nodes")
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    assert re.split(r" {2,}", header) == ["NODE", "STATUS", "JOBS", "CPU", "GPU", "MEM", "MODELS", "HEARTBEAT",
                                          "IN STATUS", "REASON"]
    mine = next(row for row in rows if row.startswith(node.node_id))
    assert mine.split()[1:4] == ["ready", "0/2", "5%"]
    assert listing.stdout.rstrip().endswith("1 ready")
    described = run_cli(system, "node", node.node_id)
    assert described.returncode == 0, described.stderr
    out = described.stdout
    assert f"Node:          {node.node_id}" in out and "Status:        ready for " in out
    assert " ago ago" not in out and "0s ago" not in out
    assert "Labels:        zone=eu" in out and "whisper (ready)" in out
    assert "registering -> ready: 3 consecutive healthy heartbeats" in out
    assert "Why not a job without requirements: eligible" in out and "ok   capacity       0/2 slots used" in out


def test_drain_and_undrain(system: Any, live_nodes: Any, r: redis.Redis) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    done = run_cli(system, "drain", node.node_id, "--reason", "disk swap", USER="carol")
    assert (done.returncode, done.stdout.strip()) == (0, f"node {node.node_id} is offline"), done.stderr
    assert r.hget(Keys().node(node.node_id), "drain_requested_by") == "carol"
    again = run_cli(system, "drain", node.node_id)
    assert again.returncode == 1 and again.stderr.startswith("dispatcher: node ")
    assert len(again.stderr.splitlines()) == 1
    back = run_cli(system, "undrain", node.node_id)
    assert back.returncode == 0 and back.stdout.strip() == (
        f"node {node.node_id} is offline: it will be ready again when it reconnects and passes its health checks")


def test_cordon_uncordon_and_the_jobs_list(system: Any, live_nodes: Any, client: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}, labels={"cli": "c"}).wait_ready()
    done = run_cli(system, "cordon", node.node_id, "--reason", "bad fan", USER="carol")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"node {node.node_id} is cordoned: no new jobs; it stays ready and finishes "
                                   "what it has")
    listing = run_cli(system, "nodes")
    assert next(row for row in listing.stdout.splitlines() if row.startswith(node.node_id)).split()[1] == \
        "ready,cordoned"
    described = run_cli(system, "node", node.node_id).stdout
    assert "by carol): bad fan" in described and "FAIL cordon         cordoned: bad fan" in described
    waiting = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr", "node_selector": {"cli": "c"}})
    jobs = wait_for(lambda: (out := run_cli(system, "jobs", "--state", "waiting").stdout) and waiting.id in out and out,
                    what="the job listed")
    header, row = jobs.splitlines()[:2]
    assert re.split(r" {2,}", header) == ["JOB", "STATE", "TYPE", "NODE", "ATTEMPT", "SUBMITTED", "OUTCOME"]
    assert row.split()[:5] == [waiting.id, "waiting", "asr", "-", "0/3"]
    back = run_cli(system, "uncordon", node.node_id)
    assert back.stdout.strip() == f"node {node.node_id} is uncordoned: it takes new jobs again", back.stderr
    node.succeed(node.take_job(job_id=waiting.id), "ok")
    assert waiting.get(timeout=10) == "ok"
    ended = run_cli(system, "jobs", "--node", node.node_id)
    assert ended.stdout.splitlines()[1].split()[:4] == [waiting.id, "succeeded", "asr", node.node_id]
    assert run_cli(system, "jobs", "--state", "cancelled", "--node", node.node_id).stdout.strip() == "no jobs"
    refused = run_cli(system, "forget", node.node_id)
    assert refused.returncode == 1 and "only an offline node can be forgotten" in refused.stderr


def test_submit_follows_the_job_and_prints_its_output(system: Any, live_nodes: Any, tmp_path: Path) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    said = tmp_path / "stderr"
    with said.open("w") as stderr:
        cli = subprocess.Popen([PYTHON, "-m", "dispatcher.cli", "submit", "--type", "asr", "--model", "m",
                                "--payload", '{"a": [1, 2]}'], env=cli_env(system), stdout=subprocess.PIPE,
                               stderr=stderr, text=True)
    try:
        job = node.take_job(timeout_s=20)
        node.send({"type": "job_progress", "job_id": job["job_id"], "attempt": 1, "progress": 0.5, "message": "half"})
        wait_for(lambda: "50% half" in said.read_text(), 20, what="the progress followed")
        node.succeed(job, {"echo": job["payload"]})
        out, _ = cli.communicate(timeout=30)
    finally:
        cli.kill()
    assert cli.returncode == 0, said.read_text()
    assert json.loads(out) == {"echo": {"a": [1, 2]}}
    assert f"running on {node.node_id} (attempt 1)" in said.read_text()


def test_submit_of_a_failing_job_exits_1_with_the_reason(system: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    import threading

    threading.Thread(target=lambda: node.fail(node.take_job(timeout_s=20), "OOM", "no memory", False),
                     daemon=True).start()
    done = run_cli(system, "submit", "--type", "asr", "--model", "m")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].endswith("JobFailed: OOM: no memory (node "
                                                 f"{node.node_id}, attempt 1 of 3)")


def test_errors_are_one_line_with_meaningful_exit_codes(system: Any, start_web: Any) -> None:
    missing = run_cli(system, "node", "nope")
    assert (missing.returncode, missing.stderr) == (3, "dispatcher: no node nope\n")
    guarded = start_web(admin_token="t0ken", **{k: v for k, v in system.settings.items()})
    refused = run_cli(system, "--url", guarded.url, "drain", "n-x")
    assert refused.returncode == 4 and "admin_token" in refused.stderr and len(refused.stderr.splitlines()) == 1
    away = run_cli(system, "--url", "http://127.0.0.1:1", "nodes")
    assert away.returncode == 5 and away.stderr.startswith("dispatcher: cannot reach the dispatcher at http://127.0.0.1:1")
    usage = run_cli(system, "submit")
    assert usage.returncode == 2 and "--type" in usage.stderr
    bad = run_cli(system, "submit", "--type", "t", "--payload", "{nope")
    assert bad.returncode == 2 and bad.stderr.startswith("dispatcher: --payload is not JSON")


def test_agent_subcommand_runs_the_agent(system: Any, tmp_path: Any) -> None:
    done = run_cli(system, "agent", "--url", "ws://127.0.0.1:1/ws/node", "--handler", "nope:nothing",
               "--state-file", str(tmp_path / "s.json"))
    assert done.returncode == 2 and "No module named 'nope'" in done.stderr


def test_submit_refuses_a_redis_other_than_the_dispatchers(system: Any, own_redis: Any) -> None:
    other_db_url, _ = own_redis  # same server, another database: the job would wait for ever
    for url, code, says in ((other_db_url, 2, "REDIS_URL is not the Redis the dispatcher"),
                            ("redis://127.0.0.1:1/0", 5, "cannot reach Redis at REDIS_URL")):
        done = subprocess.run([PYTHON, "-m", "dispatcher.cli", "submit", "--type", "t"], capture_output=True,
                              text=True, timeout=30, env=clean_env(url, DISPATCHER_URL=system.web.url))
        assert done.returncode == code and done.stderr.startswith(f"dispatcher: {says}"), done.stderr


def test_submit_says_why_a_job_waits_until_it_fails(system: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"other": "ready"}).wait_ready()
    done = run_cli(system, "submit", "--type", "asr", "--model", "whisper", "--dispatch-timeout", "2")
    assert done.returncode == 1
    waiting = [line for line in done.stderr.splitlines() if line.startswith("waiting for a node")]
    assert waiting == [f"waiting for a node: 0/1 nodes eligible: 1 ModelNotAvailable "
                       f"(e.g. ModelNotAvailable: {node.node_id})"], done.stderr
    assert "NoEligibleNode" in done.stderr.splitlines()[-1]


def test_submit_fail_fast_ends_at_once(system: Any, live_nodes: Any) -> None:
    live_nodes(system.web, {"other": "ready"}).wait_ready()
    done = run_cli(system, "submit", "--type", "asr", "--model", "whisper", "--fail-fast", timeout_s=15)
    assert done.returncode == 1
    assert "NoEligibleNode: no registered node could ever take it: 0/1 nodes eligible" in done.stderr


class EndsBetweenReads:
    """A job's result as the CLI reads it, failing after ``waiting_reads`` reads: each read of
    ``state`` or ``info`` (or ``ready()``) asks the backend again, as Celery's AsyncResult does."""

    id = "j-1"

    def __init__(self, waiting_reads: int) -> None:
        self.reads_left = waiting_reads
        self.failure = NoEligibleNode("no registered node could ever take it: 0/1 nodes eligible")

    def _read(self) -> tuple[str, Any]:
        self.reads_left -= 1
        if self.reads_left >= 0:
            return "WAITING", {"eligible": 0, "total": 1, "exclusions": {"ModelNotAvailable": 1}, "examples": {}}
        return "FAILURE", self.failure

    @property
    def state(self) -> str:
        return self._read()[0]

    @property
    def info(self) -> Any:
        return self._read()[1]

    @property
    def result(self) -> Any:
        return self._read()[1]

    def ready(self) -> bool:
        return self._read()[0] == "FAILURE"

    def successful(self) -> bool:
        return False


@pytest.mark.parametrize("waiting_reads", range(8))
def test_submit_follows_a_job_that_fails_between_two_reads(waiting_reads: int,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A fail-fast job fails within milliseconds: whichever read sees it first, the CLI says
    why it failed (a clean-checkout run once saw 'NoEligibleNode' object has no attribute 'get')."""
    assert follow(Api("http://127.0.0.1:1", None), EndsBetweenReads(waiting_reads)) == EXIT_FAILED
    assert capsys.readouterr().err.endswith(
        "dispatcher: job j-1 failure: NoEligibleNode: no registered node could ever take it: 0/1 nodes eligible\n")
