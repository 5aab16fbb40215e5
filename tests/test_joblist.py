"""Listing jobs by state and node, newest submitted first, from the indexes, with an
injected clock (``dispatcher/joblist.py``)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from dispatcher import joblist
from dispatcher.joblist import JobList
from dispatcher.jobs import RETENTION_MS, Jobs
from dispatcher.messages import decode_node_message
from dispatcher.registry import Registry
from dispatcher.vocabulary import FINAL_STATES
from tests.support import CORE_PREFIX, T0, add_node, apply_result, client_app


@pytest.fixture
def world(make_settings: Any, r: redis.Redis, db_url: str) -> tuple[Registry, Jobs, list[int]]:
    """A registry and jobs whose clock moves when the test says (``now[0]``)."""
    settings = make_settings(key_prefix=CORE_PREFIX)
    now = [T0 + 10_000]
    clock = lambda: now[0]  # noqa: E731
    return Registry(r, settings, clock=clock), Jobs(r, settings, client_app(db_url), clock=clock), now


def answer(jobs: Jobs, node_id: str, job_id: str, success: bool = True) -> str:
    frame = {"type": "job_result", "job_id": job_id, "attempt": 1, "success": success, "output": 1,
             "error": None if success else {"code": "BAD_INPUT", "message": "no", "retryable": False}}
    return apply_result(jobs, node_id, decode_node_message(json.dumps(frame)))


def ids(listed: list[dict[str, Any]]) -> list[str]:
    return [job["job_id"] for job in listed]


def test_jobs_are_listed_by_state_and_node_newest_submitted_first(world: tuple[Registry, Jobs, list[int]]) -> None:
    registry, jobs, now = world
    a = add_node(registry, models={"m": "ready"}, labels={"n": "a"}, max_jobs=5)
    b = add_node(registry, models={"m": "ready"}, labels={"n": "b"}, max_jobs=5)

    def submit(job_id: str, **fields: Any) -> None:
        now[0] += 1000
        jobs.submit(job_id, {"job_type": "asr", **fields})
    submit("done-a", node_selector={"n": "a"})
    submit("wait-low", required_models=["nobody"], priority=0)
    submit("broke-b", node_selector={"n": "b"})
    submit("wait-high", required_models=["nobody"], priority=9)
    submit("run-a", node_selector={"n": "a"})
    submit("gone", required_models=["nobody"])
    submit("run-b", node_selector={"n": "b"})
    assert answer(jobs, a, "done-a") == "succeeded"
    assert answer(jobs, b, "broke-b", success=False) == "failed"
    assert jobs.cancel("gone") == "cancelled"
    listing = JobList(jobs.client, jobs.keys)

    everything, cursor = listing.page()
    assert ids(everything) == ["run-b", "gone", "run-a", "wait-high", "broke-b", "wait-low", "done-a"]
    assert cursor is None
    assert [j["state"] for j in everything] == ["assigned", "cancelled", "assigned", "waiting", "failed",
                                                "waiting", "succeeded"]
    assert everything[4]["outcome"]["code"] == "BAD_INPUT" and everything[0]["node_id"] == b
    assert ids(listing.page("waiting")[0]) == ["wait-high", "wait-low"], "newest first, whatever the priority"
    assert ids(listing.page("running")[0]) == ["run-b", "run-a"]
    assert ids(listing.page("running", a)[0]) == ["run-a"]
    assert ids(listing.page("succeeded")[0]) == ["done-a"]
    assert ids(listing.page("failed")[0]) == ["broke-b"] and ids(listing.page("cancelled")[0]) == ["gone"]
    assert ids(listing.page(None, a)[0]) == ["run-a", "done-a"]
    assert ids(listing.page("waiting", a)[0]) == [], "a waiting job is on no node"
    assert ids(listing.page("failed", a)[0]) == []

    # page by page, the same order
    walked, cursor = [], None
    while True:
        page, cursor = listing.page(limit=2, cursor=cursor)
        assert len(page) <= 2
        walked += ids(page)
        if cursor is None:
            break
    assert walked == ids(everything)
    with pytest.raises(ValueError):
        listing.page(cursor="not a cursor")


def test_a_nodes_finished_jobs_come_in_bounded_pages_that_go_on(world: tuple[Registry, Jobs, list[int]],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With a node, finished jobs are read newest first and filtered: a page looks at a bounded
    number, so it may hold fewer than asked while its cursor goes on; none is lost or repeated."""
    registry, jobs, now = world
    monkeypatch.setattr(joblist, "_CHUNK", 3)
    monkeypatch.setattr(joblist, "FILTER_FACTOR", 2)
    a = add_node(registry, labels={"n": "a"}, max_jobs=50)
    b = add_node(registry, labels={"n": "b"}, max_jobs=50)
    mine = []
    for i in range(24):
        now[0] += 1000 if i % 4 else 0  # some submitted in the same millisecond: ties go by id
        node = a if i % 6 == 0 else b
        jobs.submit(f"j{i:02d}", {"job_type": "t", "node_selector": {"n": "a" if node == a else "b"}})
        assert answer(jobs, node, f"j{i:02d}") == "succeeded"
        if node == a:
            mine.append(f"j{i:02d}")
    listing = JobList(jobs.client, jobs.keys)
    walked, cursor, pages = [], None, 0
    while True:
        page, cursor = listing.page("succeeded", a, limit=2, cursor=cursor)
        walked += ids(page)
        pages += 1
        if cursor is None:
            break
    assert walked == sorted(mine, reverse=True) and pages > 2, (walked, pages)
    everything = ids(listing.page("succeeded", limit=100)[0])
    assert everything == [f"j{i:02d}" for i in reversed(range(24))], "same millisecond: by id, newest first"


def test_the_scan_trims_finished_jobs_to_the_retention(world: tuple[Registry, Jobs, list[int]]) -> None:
    registry, jobs, now = world
    node = add_node(registry)
    jobs.submit("old", {"job_type": "t"})
    assert answer(jobs, node, "old") == "succeeded"
    keys = jobs.keys
    assert jobs.client.zscore(keys.finished("succeeded"), "old") == now[0]
    listing = JobList(jobs.client, keys)
    assert listing.trim(now[0] + RETENTION_MS - 1, RETENTION_MS) == 0
    assert listing.trim(now[0] + RETENTION_MS + 1, RETENTION_MS) == 1
    assert all(jobs.client.zcard(keys.finished(state)) == 0 for state in FINAL_STATES)
