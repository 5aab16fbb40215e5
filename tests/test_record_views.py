"""The views on the codecs (dispatcher/records.py) answer byte for byte what they answered
before them, for any stored text: tests/records_before.py keeps the old parsing. Without
Redis. Where the old parsing failed (a view taken down), the new one must answer."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from dispatcher.filter import NODE_FIELDS, JobNeeds, evaluate
from dispatcher.fleet import job_needs, node_view
from dispatcher.joblist import listed_view
from dispatcher.jobviews import job_view
from dispatcher.records import JobRecord, NodeRecord, as_float, as_int
from dispatcher.vocabulary import FINAL_STATES, JobState
from tests import records_before as before
from tests.test_records import HOSTILE, HUGE, JOB, NODE, NOW, texts


def stored(fields: tuple[str, ...], example: dict[str, str]) -> st.SearchStrategy[dict[str, str]]:
    """Hashes of these fields: each absent, as the scripts write it, or any text."""
    return st.fixed_dictionaries({}, optional={f: st.one_of(st.just(example[f]), texts) for f in fields})


def same_json(new: Any, old: Any) -> None:
    assert json.dumps(new) == json.dumps(old)


@hsettings(max_examples=300, deadline=None)
@given(raw=stored(NodeRecord.FIELDS, NODE), assigned=st.lists(st.sampled_from(["j-1", "j-2", "j-3"]), unique=True),
       node_id=st.text(max_size=5))
def test_the_node_view_is_unchanged(raw: dict[str, str], assigned: list[str], node_id: str) -> None:
    raw = {"node_id": node_id, **raw}
    new = node_view(NodeRecord.from_hash(raw), assigned, NOW)
    try:
        old = before.node_view(raw, assigned, NOW)
    except (RecursionError, OverflowError):
        return  # (a view taken down: "[[[[..." nested too deep, a time past a float's range)
    same_json(new, old)


@hsettings(max_examples=300, deadline=None)
@given(raw=stored(JobRecord.FIELDS, JOB))
def test_the_job_view_is_unchanged(raw: dict[str, str]) -> None:
    new = job_view("j-1", JobRecord.from_hash(raw))
    try:
        old = before.job_view("j-1", raw)
    except RecursionError:
        return
    same_json(new, old)


@hsettings(max_examples=300, deadline=None)
@given(raw=stored(before.LISTED_FIELDS, JOB))
def test_a_listed_job_is_unchanged(raw: dict[str, str]) -> None:
    values = [raw.get(f) for f in before.LISTED_FIELDS]  # as HMGET answers
    job = JobRecord.from_hash(dict(zip(before.LISTED_FIELDS, values)))
    try:
        old = before.listed_view("j-1", dict(zip(before.LISTED_FIELDS, values)))
    except RecursionError:
        return
    same_json(None if job.state_text is None else listed_view("j-1", job), old)
    running = job.submitted_ms or 0 if job.state in (JobState.ASSIGNED, JobState.RUNNING) else None
    assert running == before.running_position(raw.get("state"), raw.get("submitted_ms"))


@hsettings(max_examples=200, deadline=None)
@given(raw=stored(before.METRIC_FIELDS, NODE))
def test_the_node_metrics_are_unchanged_where_they_did_not_fail(raw: dict[str, str]) -> None:
    record = {f: raw.get(f) for f in before.METRIC_FIELDS}
    try:
        old = before.node_samples(record)
    except ValueError:
        return  # ("abc" in a count took /metrics down; now it is 0)
    node = NodeRecord.from_hash(record)
    new = None if node.status_text is None else (
        node.status_text, node.max_concurrent_jobs or 0, [node.finished[s] for s in FINAL_STATES])
    assert new == old


needs_strategy = st.builds(JobNeeds, st.sampled_from([(), ("a",), ("a", "b")]), st.booleans(), st.booleans(),
                           st.sampled_from([(), (("zone", "eu"),)]))
FILTER_NODE = {**{f: NODE[f] for f in NODE_FIELDS}, "cordoned": "0"}


def changed_on_purpose(raw: dict[str, str]) -> bool:
    """The two fields the filter read as a float and now reads as the integer every view
    shows: they differ only for a text that is no integer (``"0.5"``: now 1 slot, as Lua's
    0.5 lets one job in; a number past a float's range: now that number, as Lua's
    ``tonumber`` gives infinity, where it was 0)."""
    def differs(name: str) -> bool:
        text = raw.get(name)
        integer, number = as_int(text), as_float(text)
        return (integer or 0) != (number or 0) or (integer is not None and integer != number)
    return differs("last_seen_ms") or differs("max_concurrent_jobs")


@hsettings(max_examples=500, deadline=None)
@given(raw=stored(NODE_FIELDS, FILTER_NODE), assigned=st.integers(0, 5), needs=needs_strategy)
def test_the_filter_explains_as_before(raw: dict[str, str], assigned: int, needs: JobNeeds) -> None:
    """Step by step, detail by detail (values as HMGET answers them: None for absent)."""
    values = {f: raw.get(f) for f in NODE_FIELDS}
    new = evaluate(NodeRecord.from_hash(values), assigned, needs, NOW, 45_000, 80)
    assert evaluate(values, assigned, needs, NOW, 45_000, 80) == new, "a mapping as read, as before"
    if changed_on_purpose(values):
        return
    try:
        old = before.evaluate(values, assigned, needs, NOW, 45_000, 80)
    except (TypeError, RecursionError):
        return  # (a model id that was no text made the old set unhashable; "[[[[..." too deep)
    assert new == old


@pytest.mark.parametrize(("max_jobs", "slots"), [("0.5", 1), ("2.5", 2), ("1e+17", 10**17), (HUGE, int(HUGE)),
                                                  ("abc", 1), ("0", 1), ("-1", -1)])
def test_the_slots_the_filter_counts(max_jobs: str, slots: int) -> None:
    steps = evaluate({**FILTER_NODE, "max_concurrent_jobs": max_jobs}, 0, JobNeeds(), NOW, 45_000, 80)
    assert [s.detail for s in steps if s.name == "capacity"] == [f"0/{slots} slots used"]


@pytest.mark.parametrize("text", HOSTILE, ids=lambda t: t[:12])
def test_no_view_fails_on_a_hostile_text_in_every_field(text: str) -> None:
    """Every view of a node and a job answers, as JSON, whatever every field holds."""
    node = NodeRecord.from_hash({f: text for f in NODE})
    job = JobRecord.from_hash({f: text for f in JOB})
    json.dumps(node_view(node, ["j-1"], NOW))
    json.dumps(job_view("j-1", job))
    json.dumps(listed_view("j-1", job))
    for needs in (JobNeeds(), JobNeeds(("a",), True, True, (("zone", "eu"),)), job_needs(job)):
        assert len(evaluate(node, 1, needs, NOW, 45_000, 80)) == 9


def test_a_time_past_a_floats_range() -> None:
    """Shown as stored, its age unknown; the filter reads it as Lua does (infinitely recent)."""
    node = NodeRecord.from_hash({**NODE, "last_heartbeat_ms": HUGE, "last_seen_ms": HUGE})
    view = node_view(node, [], NOW)
    assert view["last_heartbeat_ms"] == int(HUGE) and view["last_heartbeat_age_s"] is None
    online = evaluate(node, 0, JobNeeds(), NOW, 45_000, 80)[1]
    assert online.passed and online.detail == "last heard -inf s ago (timeout 45 s)"


def test_the_needs_of_a_job_record() -> None:
    """As the filter reads them from the hash; what cannot be a name or a label is not asked for."""
    assert job_needs(JobRecord.from_hash(JOB)) == JobNeeds.from_stored(JOB)
    odd = JobRecord.from_hash({**JOB, "required_models": '["a", 1, {}]', "node_selector": '{"zone": "eu", "k": 2}'})
    assert job_needs(odd) == JobNeeds(("a",), True, False, (("zone", "eu"),))
    assert job_needs(JobRecord.from_hash({"required_models": "{", "node_selector": "["})) == JobNeeds()


class _Api:
    """Answers the CLI's calls with the views of one stored node and one stored job."""

    def __init__(self, node: dict[str, Any], job: dict[str, Any]) -> None:
        self.node, self.job = json.loads(json.dumps(node)), json.loads(json.dumps(job))

    def call(self, method: str, path: str, body: Any = None) -> Any:
        if path.startswith("/api/nodes?"):
            return {"nodes": [self.node], "next_cursor": None, "counts": {"ready": 1}}
        if path.endswith("/eligibility"):
            return {"eligible": True, "first_failure": None, "steps": []}
        if path.startswith("/api/nodes/"):
            return {**self.node, "transitions": [{"from": None, "to": "ready", "reason": "x", "at_ms": NOW}, {}]}
        return {"jobs": [self.job], "next_cursor": None}


@pytest.mark.parametrize("text", [*HOSTILE, '[{"model_id": 1}]', '[{"status": "ready"}]', '{"gpus": [{}, 1]}',
                                  '{"gpus": 5}', '{"memory_gb": "x", "cpu_cores": null}'], ids=lambda t: t[:12])
@pytest.mark.parametrize("every_field", [True, False])
def test_the_cli_shows_any_record(text: str, every_field: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """``dispatcher nodes``, ``node`` and ``jobs`` show a node and a job whatever their fields hold
    (the text in every field, or in each field alone)."""
    from dispatcher import cli

    cases = [({f: text for f in NODE}, {f: text for f in JOB})] if every_field else \
        [({**NODE, f: text}, JOB) for f in NODE] + [(NODE, {**JOB, f: text}) for f in JOB] + \
        [({"node_id": "n-1", "hardware": text}, {"state": text})]  # (the others absent)
    for node_hash, job_hash in cases:
        node, job = NodeRecord.from_hash(node_hash), JobRecord.from_hash(job_hash)
        api = _Api(node_view(node, ["j-1"], NOW), listed_view("j-1", job))
        cli.show_nodes(api, None)  # type: ignore[arg-type]
        cli.show_node(api, "n-1", None)  # type: ignore[arg-type]
        cli.show_jobs(api, None, None, 50)  # type: ignore[arg-type]
    assert capsys.readouterr().out
