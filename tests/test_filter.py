"""dispatcher/filter.py alone (no Redis): the steps that explain why a node may not take a
job, the one-line summary of a decision, and the kinds of needs jobs wait by."""

from __future__ import annotations

import json

import pytest

from dispatcher.filter import JobNeeds, evaluate, explanation, first_failure, summarize
from dispatcher.vocabulary import Exclusion

NOW = 1_800_000_000_000
#: A ready node that passes every step of a job needing model "a", a GPU, the public pool and zone=1.
FIT = {"status": "ready", "last_seen_ms": str(NOW - 2_000), "accept_public": "1", "labels": '{"zone": "1"}',
       "gpu_available": "1", "models": '[{"model_id": "a", "status": "ready"}]', "max_concurrent_jobs": "2",
       "cpu_percent": "10", "gpu_percent": "20", "mem_percent": "30", "cordoned": "0"}
NEEDS = JobNeeds(("a",), True, True, (("zone", "1"),))


def steps(node: dict[str, str], assigned: int = 0, needs: JobNeeds = NEEDS) -> dict[str, tuple[bool, str]]:
    return {s.name: (s.passed, s.detail) for s in evaluate(node, assigned, needs, NOW, 45_000, 80)}


def test_a_node_that_fits_passes_every_step_and_says_what_it_compared() -> None:
    assert steps(FIT) == {
        "status": (True, "status ready"),
        "online": (True, "last heard 2.0 s ago (timeout 45 s)"),
        "public_pool": (True, "accepts public jobs: yes"),
        "node_selector": (True, "labels match"),
        "gpu": (True, "GPU available: yes"),
        "models": (True, "ready: a"),
        "cordon": (True, "not cordoned"),
        "capacity": (True, "0/2 slots used"),
        "resources": (True, "cpu 10%, gpu 20%, mem 30% < 80%"),
    }
    assert first_failure(evaluate(FIT, 0, NEEDS, NOW, 45_000, 80)) is None


@pytest.mark.parametrize(("change", "assigned", "reason", "detail"), [
    ({"status": "degraded"}, 0, "StatusNotReady", "status degraded"),
    ({"last_seen_ms": str(NOW - 45_000)}, 0, "StatusNotReady", "last heard 45.0 s ago (timeout 45 s)"),
    ({"accept_public": "0"}, 0, "NotInPublicPool", "accepts public jobs: no"),
    ({"labels": '{"zone": "2"}'}, 0, "NodeSelectorMismatch", "missing labels zone=1"),
    ({"gpu_available": "0"}, 0, "GpuUnavailable", "GPU available: no"),
    ({"models": '[{"model_id": "a", "status": "loading"}]'}, 0, "ModelNotAvailable", "not ready: a"),
    ({"cordoned": "1", "cordon_reason": "bad fan"}, 0, "NodeCordoned", "cordoned: bad fan"),
    ({}, 2, "CapacityExceeded", "2/2 slots used"),
    ({"cpu_percent": "80"}, 0, "ResourceThresholdExceeded", "cpu 80% >= 80%"),
])
def test_each_step_fails_on_its_own_naming_its_reason(change: dict[str, str], assigned: int, reason: str,
                                                      detail: str) -> None:
    failed = first_failure(evaluate({**FIT, **change}, assigned, NEEDS, NOW, 45_000, 80))
    assert failed is not None and (failed.reason, failed.detail) == (reason, detail)
    assert [s.reason for s in evaluate({**FIT, **change}, assigned, NEEDS, NOW, 45_000, 80)
            if not s.passed] == [reason], "only that step fails"


def test_a_job_that_asks_for_nothing_says_so_and_any_ready_node_fits() -> None:
    plain = {"status": "ready", "last_seen_ms": str(NOW)}
    assert steps(plain, needs=JobNeeds()) == {
        "status": (True, "status ready"), "online": (True, "last heard 0.0 s ago (timeout 45 s)"),
        "public_pool": (True, "job is not public"), "node_selector": (True, "no selector"),
        "gpu": (True, "job needs no GPU"), "models": (True, "no models required"), "cordon": (True, "not cordoned"),
        "capacity": (True, "0/1 slots used"), "resources": (True, "cpu 0%, gpu 0%, mem 0% < 80%"),
    }


def test_a_corrupt_record_is_explained_not_raised() -> None:
    broken = {"status": None, "last_seen_ms": "soon", "labels": "[1]", "models": "{not json",
              "max_concurrent_jobs": "abc", "cpu_percent": "NaN"}
    failed = first_failure(evaluate(broken, 0, NEEDS, NOW, 45_000, 80))  # type: ignore[arg-type]
    assert failed is not None and (failed.reason, failed.detail) == ("StatusNotReady", "status unknown")


def test_the_summary_counts_reasons_in_the_filters_order_with_examples() -> None:
    counts = {"ModelNotAvailable": 4, "StatusNotReady": 5, "CapacityExceeded": 0}
    examples = {"ModelNotAvailable": ["n-3"], "StatusNotReady": ["n-1", "n-2"]}
    assert summarize(0, 12, counts, examples) == (
        "0/12 nodes eligible: 5 StatusNotReady, 4 ModelNotAvailable "
        "(e.g. StatusNotReady: n-1, n-2; ModelNotAvailable: n-3)")
    assert summarize(3, 3, {}, {}) == "3/3 nodes eligible"
    assert explanation(counts, examples) == {"counts": {"StatusNotReady": 5, "ModelNotAvailable": 4},
                                             "examples": {"StatusNotReady": ["n-1", "n-2"],
                                                          "ModelNotAvailable": ["n-3"]}}
    assert list(explanation(dict.fromkeys(reversed(Exclusion), 1), {})["counts"]) == list(Exclusion)


def test_jobs_that_need_the_same_are_of_one_kind_whatever_the_order() -> None:
    one = JobNeeds(("b", "a"), True, False, (("zone", "1"), ("rack", "r7")))
    same = JobNeeds(("a", "b", "a"), True, False, (("rack", "r7"), ("zone", "1")))
    assert one.kind == same.kind and len(one.kind) == 16
    assert JobNeeds(("a",)).kind != JobNeeds(("a",), require_gpu=True).kind != JobNeeds(("a",), public=True).kind
    assert JobNeeds.from_json(one.to_json()).kind == one.kind


def test_needs_read_back_from_a_stored_job() -> None:
    stored = {"required_models": '["a"]', "require_gpu": "1", "public": "0", "node_selector": '{"z": "9", "a": "1"}'}
    assert JobNeeds.from_stored(stored) == JobNeeds(("a",), True, False, (("a", "1"), ("z", "9")))
    assert JobNeeds.from_values([None, None, None, None]) is None, "no such job"
    values = [stored[field] for field in JobNeeds.FIELDS]
    assert JobNeeds.from_values(values) == JobNeeds.from_stored(stored)
    assert json.loads(JobNeeds().to_json()) == {"required_models": [], "require_gpu": False, "public": False,
                                                "node_selector": {}}
