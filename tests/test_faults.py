"""Reliability under crashes: real processes are killed (SIGKILL) mid-flight,
and every job still ends exactly once, with the node's real output."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from dispatcher.keys import Keys
from dispatcher.localrun.redis_server import LocalRedis
from tests.support import Process, WebServer, clean_env, client_app, job_attempts, start_procfile, wait_for

FAST = {"require_gpu": False, "resource_threshold_percent": 100, "heartbeat_interval_seconds": 0.3,
        "heartbeat_timeout_seconds": 3, "periodic_scan_interval_seconds": 0.5,
        "delivery_sweep_interval_seconds": 0.5}


def submit(client: Any, job_type: str, ignore_result: bool = False, **payload: Any) -> Any:
    return client.send_task("dispatcher.submit_job", task_id=f"job-{uuid.uuid4()}", ignore_result=ignore_result,
                            kwargs={"job_type": job_type, "payload": payload, "max_attempts": 3})


def finished_per_job(*agents: Process) -> Counter[str]:
    """How many times the nodes ran each job to its end."""
    runs: Counter[str] = Counter()
    for agent in agents:
        for line in agent.log().splitlines():
            if '"event": "job_finished"' in line:
                runs[json.loads(line)["job_id"]] += 1
    return runs


def attempts(r: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    return job_attempts(r, job_id)


def assert_ended_once(r: redis.Redis, job_ids: list[str]) -> None:
    """One terminal outcome per job, nothing left half-way in the dispatcher's records."""
    for job_id in job_ids:
        history = attempts(r, job_id)
        assert [a["outcome"] for a in history].count("succeeded") == 1, history
        assert r.hget(Keys().job(job_id), "state") == "succeeded"
    wait_for(lambda: r.zcard(Keys().waiting()) == 0,
             what="nothing left half-way")


def test_web_process_killed_between_pop_and_send(own_redis: Any, logs_dir: Path, tmp_path: Path,
                                                 agents: Any) -> None:
    """Ten jobs; the web process holding both nodes' sessions dies (master and
    worker) right after popping the first job_assign, before sending it. It is
    restarted on its port; the agents reconnect and resume; every job is sent
    again, run once, and returns its output."""
    redis_url, r = own_redis
    client = client_app(redis_url)
    flag = tmp_path / "armed"
    flag.touch()
    settings = {**FAST, "job_reassign_grace_seconds": 30}  # the restart beats the grace: nothing is re-dispatched
    web = WebServer(redis_url, logs_dir, config="python:tests.faults.web_dies_before_send",
                    FAULT_FLAG=str(flag), **settings).start()
    env = clean_env(redis_url, **settings)
    worker, beat = start_procfile("worker", env, logs_dir), start_procfile("beat", env, logs_dir)
    try:
        nodes = [agents(web, tmp_path / f"a{i}.json", "--max-concurrent-jobs", "3") for i in range(2)]
        wait_for(lambda: r.scard(Keys().status_set("ready")) == 2, what="two ready nodes")
        results = [submit(client, "sleep", seconds=0.3, i=i) for i in range(10)]
        wait_for(lambda: not web.process.alive(), what="the web process to die")
        assert not flag.exists(), "it died where the fault was injected"
        web.start(config="python:web.gunicorn_conf")
        outputs = [res.get(timeout=60) for res in results]
        assert [o["payload"]["i"] for o in outputs] == list(range(10))
        assert_ended_once(r, [res.id for res in results])
        assert all(len(attempts(r, res.id)) == 1 for res in results), "resumed nodes kept their jobs"
        runs = finished_per_job(*nodes)
        assert runs == Counter({res.id: 1 for res in results}), "redelivered assignments were not run twice"
    finally:
        for process in (beat, worker):
            process.stop()
        web.stop()


def test_web_process_killed_right_after_it_handed_a_result_on(own_redis: Any, logs_dir: Path, tmp_path: Path,
                                                              agents: Any) -> None:
    """The web process hands a node's result on to the workers, then dies (SIGKILL,
    master and worker) before anything else. A worker applies the result: SUCCESS
    once, with the output, though the process that received it is gone."""
    redis_url, r = own_redis
    client = client_app(redis_url)
    flag = tmp_path / "armed"
    flag.touch()
    web = WebServer(redis_url, logs_dir, config="python:tests.faults.web_dies_after_a_result",
                    FAULT_FLAG=str(flag), **FAST).start()
    env = clean_env(redis_url, **FAST)
    worker, beat = start_procfile("worker", env, logs_dir), start_procfile("beat", env, logs_dir)
    try:
        agents(web, tmp_path / "a.json")
        wait_for(lambda: r.scard(Keys().status_set("ready")) == 1, what="a ready node")
        result = submit(client, "echo", text="survives")
        wait_for(lambda: not web.process.alive(), timeout_s=20, what="the web process to die")
        assert result.get(timeout=30) == {"text": "survives"}
        assert_ended_once(r, [result.id])
    finally:
        for process in (beat, worker):
            process.stop()
        web.kill()


def test_worker_killed_holding_results(own_redis: Any, logs_dir: Path, tmp_path: Path, agents: Any,
                                       start_web: Any) -> None:
    """The only worker reads results from the stream and dies (SIGKILL, its whole
    process group) before applying them. A worker started afterwards claims them
    through the scan and applies them: every job SUCCESS once, with its output."""
    redis_url, r = own_redis
    client = client_app(redis_url)
    flag = tmp_path / "armed"
    flag.touch()
    web = start_web(REDIS_URL=redis_url, **FAST)
    env = clean_env(redis_url, **FAST)
    doomed = start_procfile("worker", {**env, "FAULT_FLAG": str(flag)}, logs_dir,
                            celery_app="tests.faults.worker_dies_holding_results")
    beat = start_procfile("beat", env, logs_dir)
    worker = None
    try:
        agents(web, tmp_path / "a.json", "--max-concurrent-jobs", "4")
        wait_for(lambda: r.scard(Keys().status_set("ready")) == 1, what="a ready node")
        # Jobs that take a while: every submission is out of the doomed worker's hands (a
        # submission it holds when killed comes back only after the broker's visibility
        # timeout) before the first result reaches it.
        results = [submit(client, "sleep", seconds=4, text=f"t{i}") for i in range(4)]
        wait_for(lambda: all(r.hget(Keys().job(res.id), "state") == "running" for res in results), timeout_s=3.5,
                 what="every job running before any result")
        wait_for(lambda: not doomed.alive(), timeout_s=20, what="the worker to die")
        assert not flag.exists(), "it died where the fault was injected"
        assert r.xpending(Keys().results(), "completers")["pending"] >= 1, "it held results"
        worker = start_procfile("worker", env, logs_dir)
        assert [res.get(timeout=30)["payload"] for res in results] == [{"seconds": 4, "text": f"t{i}"}
                                                                       for i in range(4)]
        assert_ended_once(r, [res.id for res in results])
    finally:
        doomed.kill()
        for process in (beat, worker):
            if process is not None:
                process.stop()


def test_node_killed_mid_job(own_redis: Any, logs_dir: Path, tmp_path: Path, agents: Any, start_web: Any) -> None:
    """A node dies while running a job; after the grace the job runs on the
    other node (attempt 2) and succeeds once."""
    redis_url, r = own_redis
    client = client_app(redis_url)
    settings = {**FAST, "job_reassign_grace_seconds": 1}
    web = start_web(REDIS_URL=redis_url, **settings)
    env = clean_env(redis_url, **settings)
    worker, beat = start_procfile("worker", env, logs_dir), start_procfile("beat", env, logs_dir)
    try:
        first = agents(web, tmp_path / "a.json")
        state_file = tmp_path / "a.json"
        node_a = wait_for(lambda: state_file.exists() and json.loads(state_file.read_text())["node_id"],
                          what="first node registered")
        wait_for(lambda: r.sismember(Keys().status_set("ready"), node_a), what="first node ready")
        result = submit(client, "sleep", seconds=2)
        wait_for(lambda: result.state == "STARTED", what="running on the first node")
        second = agents(web, tmp_path / "b.json")
        first.kill()
        output = result.get(timeout=30)
        assert output["slept_seconds"] == 2
        history = attempts(r, result.id)
        assert [(a["node_id"] == node_a, a["outcome"]) for a in history] == [(True, "NODE_LOST"), (False, "succeeded")]
        assert finished_per_job(second)[result.id] == 1
        assert_ended_once(r, [result.id])
    finally:
        for process in (beat, worker):
            process.stop()


def test_redis_killed_and_restarted_mid_flight(logs_dir: Path, tmp_path: Path, agents: Any, start_web: Any) -> None:
    """Redis dies (SIGKILL) while ten jobs run on two nodes and comes back on
    its port three seconds later, from its append-only file (fsync always).
    Web, worker and beat reconnect by themselves; the results the nodes sent
    while it was down reach it when the nodes resume (the session that could
    not record a result is closed); every job ends once, run once."""
    store = LocalRedis(tmp_path / "redis", appendfsync="always").start()
    r = redis.Redis.from_url(store.url, decode_responses=True)
    client = client_app(store.url)
    settings = {**FAST, "job_reassign_grace_seconds": 30}  # nodes back late keep their jobs: none runs twice
    web = start_web(REDIS_URL=store.url, **settings)
    env = clean_env(store.url, **settings)
    worker, beat = start_procfile("worker", env, logs_dir), start_procfile("beat", env, logs_dir)
    try:
        nodes = [agents(web, tmp_path / f"a{i}.json", "--max-concurrent-jobs", "5") for i in range(2)]
        wait_for(lambda: r.scard(Keys().status_set("ready")) == 2, what="two ready nodes")
        # Submitted without subscribing to the results: a Celery client that waits
        # in get() across a Redis restart can miss a result published while its
        # result consumer reconnects. What the dispatcher owes is a right backend,
        # read here by a client started after the restart.
        results = [submit(client, "sleep", ignore_result=True, seconds=1.5, i=i) for i in range(10)]
        wait_for(lambda: all(res.state == "STARTED" for res in results), what="every job running")
        store.kill()
        # The jobs end while it is down (the nodes say so): their results cannot be recorded.
        wait_for(lambda: set(finished_per_job(*nodes)) >= {res.id for res in results}, 20, 0.1,
                 what="every job ended on its node while Redis was down")
        store.start()
        after = client_app(store.url)
        outputs = [after.AsyncResult(res.id).get(timeout=60) for res in results]
        assert [o["payload"]["i"] for o in outputs] == list(range(10))
        assert_ended_once(r, [res.id for res in results])
        assert finished_per_job(*nodes) == Counter({res.id: 1 for res in results}), "no job ran twice"
        assert worker.alive() and beat.alive() and web.process.alive()
    finally:
        for process in (beat, worker):
            process.stop()
        web.stop()
        store.stop()
