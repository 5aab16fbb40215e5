"""The views on the codecs (dispatcher/records.py), without Redis: every view answers, as
JSON, whatever a stored field holds; the filter counts slots and ages as Lua does; the CLI
shows any record. (When the codecs came in, a hypothesis comparison against the old parsing
showed the views' JSON unchanged byte for byte; it went with the old code, see the commit.)"""

from __future__ import annotations

import json
from typing import Any

import pytest

from dispatcher.filter import NODE_FIELDS, JobNeeds, evaluate
from dispatcher.fleet import job_needs, node_view
from dispatcher.joblist import listed_view
from dispatcher.jobviews import job_view
from dispatcher.records import JobRecord, NodeRecord
from tests.support.records import HOSTILE, HUGE, JOB, NODE, NOW

FILTER_NODE = {**{f: NODE[f] for f in NODE_FIELDS}, "cordoned": "0"}


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
