"""What a client may submit, and what a crowd of submissions costs: ids that could
name other keys are refused before anything is written, payloads stay out of logs
and stored results, and jobs no node can take do not slow anything else down."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from dispatcher.errors import InvalidJob, StoreError
from dispatcher.filter import JobNeeds
from dispatcher.jobs import Jobs
from dispatcher.keys import Keys
from dispatcher.localrun.redis_server import LocalRedis
from dispatcher.messages import MAX_JSON_DEPTH, decode_node_message, decode_server_message
from dispatcher.recovery import Recovery
from dispatcher.registry import Registry
from tests.support import T0, add_node, apply_result, client_app, wait_for


@pytest.fixture
def quiet_server(tmp_path: Path) -> Iterator[LocalRedis]:
    """A redis-server of its own: its command counts are this test's alone."""
    server = LocalRedis(tmp_path / "redis", append_only=False).start()
    yield server
    server.stop()


@pytest.fixture
def quiet_redis(quiet_server: LocalRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(quiet_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def core(make_settings: Any, quiet_server: LocalRedis, quiet_redis: redis.Redis) -> tuple[Registry, Jobs]:
    settings = make_settings(redis_url=quiet_server.url)
    clock = lambda: T0 + 10_000  # noqa: E731
    return (Registry(quiet_redis, settings, clock=clock),
            Jobs(quiet_redis, settings, client_app(quiet_server.url), clock=clock))


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


@pytest.mark.parametrize("job_id", ["other:attempts", "x" * 129, "a b", "", "é", "line\n", "{dispatcher}"])
def test_a_job_id_that_could_name_another_key_is_refused_and_nothing_is_written(
        core: tuple[Registry, Jobs], quiet_redis: redis.Redis, job_id: str) -> None:
    _, jobs = core
    with pytest.raises(InvalidJob, match="job_id"):
        jobs.submit(job_id, {"job_type": "asr"})
    assert quiet_redis.dbsize() == 0


def test_the_scripts_refuse_a_bad_id_before_writing(core: tuple[Registry, Jobs], quiet_redis: redis.Redis) -> None:
    _, jobs = core
    search = jobs.dispatcher.search(JobNeeds((), False, False, ()))
    for call in (lambda: jobs.scripts.submit_job("a:b", "k", T0, 0, {}, search),
                 lambda: jobs.scripts.cancel_job("a:b", "k", "n", T0, "r", 1000),
                 lambda: jobs.scripts.complete_job("j", "k", "n:queue", 1, T0, "{}", "1", 1000)):
        with pytest.raises(StoreError, match="invalid"):
            call()
    assert quiet_redis.dbsize() == 0


@pytest.mark.parametrize(("payload", "why"), [
    ({"x": math.nan}, "not a JSON number"), ({"x": [math.inf]}, "not a JSON number"),
    (nested(MAX_JSON_DEPTH + 1), "nested deeper"),
])
def test_a_payload_no_node_could_read_is_refused(core: tuple[Registry, Jobs], quiet_redis: redis.Redis,
                                                 payload: dict[str, Any], why: str) -> None:
    _, jobs = core
    with pytest.raises(InvalidJob, match=f"payload.*{why}"):
        jobs.submit("j", {"job_type": "asr", "payload": payload})
    assert quiet_redis.dbsize() == 0


def test_the_deepest_payload_accepted_reaches_an_agent_intact(core: tuple[Registry, Jobs],
                                                              quiet_redis: redis.Redis) -> None:
    registry, jobs = core
    node_id = add_node(registry)
    jobs.submit("deep", {"job_type": "asr", "payload": nested(MAX_JSON_DEPTH)})
    frame = next(f for f in quiet_redis.lrange(Keys().queue(node_id), 0, -1) if '"job_assign"' in f)
    assert decode_server_message(frame).payload == nested(MAX_JSON_DEPTH)


def test_payloads_stay_out_of_logs_and_stored_results(system: Any, client: Any, live_nodes: Any,
                                                      r: redis.Redis) -> None:
    node = live_nodes(system.web, {"whisper": "ready"}).wait_ready()
    secret = f"signed-{uuid.uuid4().hex}"
    ok = client.send_task("dispatcher.submit_job", task_id=f"job-{uuid.uuid4()}",
                          kwargs={"job_type": "asr", "payload": {"url": secret}})
    node.succeed(node.take_job(), {"done": True})
    assert ok.get(timeout=10) == {"done": True}
    refused = client.send_task("dispatcher.submit_job", kwargs={"job_type": "asr", "payload": {"url": secret},
                                                                "priority": 99})
    with pytest.raises(Exception, match="priority"):
        refused.get(timeout=10)
    wait_for(lambda: ok.id in system.worker.log(), what="the worker logged the job")
    assert secret not in system.worker.log() and secret not in system.web.process.log()
    for key in r.scan_iter("celery-task-meta-*"):
        assert secret not in r.get(key), key
    stored = json.loads(r.get(f"celery-task-meta-{refused.id}"))
    assert stored["status"] == "FAILURE" and "kwargs" not in stored and "args" not in stored


def commands(client: redis.Redis) -> int:
    """Commands the server ran so far, those inside scripts included."""
    return sum(stats["calls"] for stats in client.info("commandstats").values())


def test_jobs_no_node_can_take_do_not_slow_completions_or_submissions(core: tuple[Registry, Jobs],
                                                                      quiet_redis: redis.Redis) -> None:
    """Jobs waiting for a model nobody has: a submission and a completion cost the
    same with 2,000 waiting as with one, and within twice their cost with none
    waiting (counted in Redis commands): a newcomer only checks whether a job
    waiting ahead of it could take its node, and a freed slot asks for a pass over
    the waiting jobs only when one of them could take it."""
    registry, jobs = core
    node_id = add_node(registry, max_jobs=1)

    def one_job(job_id: str) -> tuple[int, int]:
        """Commands of a submission, and of the node's result applied."""
        quiet_redis.delete(Keys().kick())  # each measure asks for its own pass over the waiting jobs
        jobs.dispatcher.flush()  # the statistics are written a second later: not in this measure
        before = commands(quiet_redis)
        jobs.submit(job_id, {"job_type": "asr"})
        submitted = commands(quiet_redis)
        frame = json.dumps({"type": "job_result", "job_id": job_id, "attempt": 1, "success": True, "output": 1})
        assert apply_result(jobs, node_id, decode_node_message(frame)) == "succeeded"
        return submitted - before, commands(quiet_redis) - submitted

    def hopeless(count: int, start: int = 0) -> None:
        for i in range(start, start + count):
            jobs.submit(f"hopeless-{i}", {"job_type": "asr", "required_models": ["nobody-has-it"]})

    one_job("warm")  # the scripts loaded (SCRIPT LOAD counts as a command)
    none_waiting = one_job("alone")
    hopeless(1)
    one_waiting = one_job("behind-one")
    hopeless(1999, start=1)
    assert quiet_redis.zcard(Keys().waiting()) == 2000
    many_waiting = one_job("behind-a-backlog")
    # (A few commands of slack: the statistics flusher writes once a second, whenever that falls.)
    assert all(m <= o + 6 for m, o in zip(many_waiting, one_waiting, strict=True)), (
        "the cost does not grow with the jobs waiting", one_waiting, many_waiting)
    assert many_waiting[0] <= 2 * none_waiting[0] and many_waiting[1] <= 2 * none_waiting[1], (
        none_waiting, many_waiting)


def test_expiring_a_crowd_of_waiting_jobs_explains_each_kind_once(core: tuple[Registry, Jobs],
                                                                  quiet_redis: redis.Redis) -> None:
    registry, jobs = core
    for _ in range(20):
        add_node(registry)
    for i in range(300):
        jobs.submit(f"late-{i}", {"job_type": "asr", "required_models": ["gone"], "dispatch_timeout_seconds": 0})
    before = quiet_redis.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0)
    summary = Recovery(jobs).scan(now=T0 + 20_000)
    hmgets = quiet_redis.info("commandstats")["cmdstat_hmget"]["calls"] - before
    assert len(summary.expired_waiting) == 300
    assert hmgets < 300 * 5 + 20 * 2, "the fleet (20 nodes) is walked once, not once per job"
    failed = json.loads(quiet_redis.hget(Keys().job("late-7"), "outcome"))
    assert failed["code"] == "NO_ELIGIBLE_NODE" and "20 ModelNotAvailable" in failed["message"]
