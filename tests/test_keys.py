"""dispatcher/keys.py alone: every name under one prefix whose braces make it a Redis Cluster
hash tag, so a script's keys share a slot; the bundles in the order the scripts read them."""

from __future__ import annotations

import pytest

from dispatcher.filter import JobNeeds
from dispatcher.keys import JOB_BUNDLE, NODE_BUNDLE, Keys
from dispatcher.vocabulary import FINAL_STATES, NodeStatus


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes: the text between the first "{" and the next "}", when not empty."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1:end] if start >= 0 and end > start + 1 else key


@pytest.mark.parametrize("prefix", ["{dispatcher}", "{tenant-7}"])
def test_every_key_of_a_node_and_of_a_job_shares_the_prefixs_slot(prefix: str) -> None:
    keys = Keys(prefix)
    ours = [*keys.node_bundle("n-1"), *keys.job_bundle("j-1", "k1"), *keys.model_indexes(["whisper"]),
            *keys.label_indexes([("zone", "eu")]), keys.stats(), keys.results(), keys.kick(), keys.wake_channel()]
    celerys = keys.celery_result("j-1")
    assert {hash_tag(k) for k in ours if k != celerys} == {prefix.strip("{}")}
    assert all(k.startswith(f"{prefix}:") for k in ours if k != celerys)
    assert celerys == "celery-task-meta-j-1", "Celery's own result key, which its clients read"


def test_the_bundles_follow_the_order_the_scripts_are_given() -> None:
    keys = Keys()
    node = keys.node_bundle("n-1")
    assert len(node) == len(NODE_BUNDLE) == len(set(node))
    assert node[:4] == [keys.node("n-1"), keys.nodes(), keys.liveness(), keys.warmup()]
    assert node[4:4 + len(NodeStatus)] == [keys.status_set(s) for s in NodeStatus]
    assert node[NODE_BUNDLE.index("assigned")] == keys.assigned("n-1")
    job = keys.job_bundle("j-1", None)
    assert len(job) == len(JOB_BUNDLE) == len(set(job))
    assert job[JOB_BUNDLE.index("result")] == keys.celery_result("j-1")
    assert job[-len(FINAL_STATES):] == [keys.finished(s) for s in FINAL_STATES]


def test_names_of_two_nodes_or_two_kinds_never_meet() -> None:
    keys = Keys()
    assert keys.node("a") != keys.node("b") and keys.queue("a") != keys.assigned("a")
    kinds = {JobNeeds(("a",)).kind, JobNeeds(("b",)).kind}
    assert len({keys.waiting_class(kind) for kind in kinds}) == 2
    assert keys.waiting_class(None) not in {keys.waiting_class(kind) for kind in kinds}, \
        "a script that is given no kind names no kind's set"
    parts = keys.node_key_parts()
    assert parts["head"] + "n-1" == keys.node("n-1")
    assert parts["head"] + "n-1" + parts["queue"] == keys.queue("n-1")
    assert parts["head"] + "n-1" + parts["assigned"] == keys.assigned("n-1")
