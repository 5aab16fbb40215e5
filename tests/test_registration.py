"""Registration rules of the contract: new ids, conflicts, resume, tokens, secrets."""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import pytest
import redis

from dispatcher.errors import NodeIdConflict, Unauthorized
from dispatcher.keys import Keys
from dispatcher.messages import DecodeError, NodeRegister, decode_node_message, valid_node_id
from dispatcher.registry import Registry
from tests.support import T0, beat, make_ready, register


def test_a_new_node_gets_an_id_and_a_secret_stored_only_as_a_hash(registry: Registry, r: redis.Redis,
                                                                   keys: Keys) -> None:
    reg = register(registry)
    assert valid_node_id(reg.node.node_id) and len(reg.secret) >= 32
    stored = r.hgetall(keys.node(reg.node.node_id))
    assert stored["secret_hash"] == hashlib.sha256(reg.secret.encode()).hexdigest()
    for key in r.keys("*"):
        if r.type(key) == "hash":
            assert reg.secret not in json.dumps(r.hgetall(key)), f"secret in clear under {key}"


def test_an_unknown_valid_node_id_is_accepted_as_given(registry: Registry) -> None:
    reg = register(registry, node_id="gpu-box_07.eu")
    assert reg.node.node_id == "gpu-box_07.eu" and not reg.resumed


@pytest.mark.parametrize("node_id", ["", "has space", "x" * 65, "slash/no", "ü", "victim-1\n", "x" * 190_000])
def test_an_invalid_node_id_is_refused_naming_the_field(node_id: str) -> None:
    with pytest.raises(DecodeError, match=r"^node_id: String should match") as raised:
        decode_node_message(json.dumps({"type": "node_register", "node_id": node_id}))
    assert len(str(raised.value)) < 200, "the answer does not echo the id"


@pytest.mark.parametrize("secret", [None, "wrong"])
def test_known_node_id_without_its_secret_conflicts_and_changes_nothing(registry: Registry, r: redis.Redis,
                                                                         keys: Keys, secret: str | None) -> None:
    reg = register(registry, node_id="gpu-1", labels={"region": "eu"})
    before = {k: (r.type(k), r.dump(k)) for k in r.keys("*")}
    with pytest.raises(NodeIdConflict) as raised:
        register(registry, now=T0 + 5, node_id="gpu-1", node_secret=secret, labels={"region": "us"})
    assert str(raised.value) == "node_id conflict: clear the local node_id and register again"
    assert {k: (r.type(k), r.dump(k)) for k in r.keys("*")} == before
    assert r.hget(keys.node("gpu-1"), "session_id") == reg.node.session_id


def test_resume_with_the_secret_keeps_identity_and_jobs_and_starts_fresh(registry: Registry, r: redis.Redis,
                                                                          keys: Keys) -> None:
    reg = register(registry, node_id="gpu-1", installed_models=[{"model_id": "a", "status": "ready"}])
    now = make_ready(registry, reg)
    assign = json.dumps({"type": "job_assign", "job_id": "j1", "attempt": 1, "job_type": "asr"})
    r.hset(keys.assigned("gpu-1"), "j1", assign)
    again = register(registry, now=now + 1000, node_id="gpu-1", node_secret=reg.secret,
                     installed_models=[{"model_id": "b", "status": "ready"}])
    assert again.resumed and again.secret == reg.secret and again.old_session_id == reg.node.session_id
    node = r.hgetall(keys.node("gpu-1"))
    assert (node["status"], node["window"], node["consecutive_ok"]) == ("registering", "", "0")
    assert node["session_id"] == again.node.session_id
    assert r.hgetall(keys.assigned("gpu-1")) == {"j1": assign}
    queued = r.lrange(keys.queue("gpu-1"), 0, -1)
    assert assign in queued, "the resumed node is sent its assigned jobs again"
    # the model indexes follow the new list
    assert not r.sismember(keys.model_index("a"), "gpu-1") and r.sismember(keys.model_index("b"), "gpu-1")


def test_the_older_session_is_refused_after_a_resume(registry: Registry) -> None:
    old = register(registry, node_id="gpu-1")
    register(registry, now=T0 + 10, node_id="gpu-1", node_secret=old.secret)
    assert beat(registry, old, T0 + 20).refused == "superseded"
    assert registry.close_session("gpu-1", old.node.session_id) is None, "an old session's close is ignored"


def test_two_registrations_of_one_new_id_race_and_one_wins(registry: Registry) -> None:
    results: list[Any] = []
    barrier = threading.Barrier(2)

    def attempt() -> None:
        barrier.wait()
        try:
            results.append(register(registry, node_id="contested"))
        except NodeIdConflict as exc:
            results.append(exc)
    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(type(x).__name__ for x in results) == ["NodeIdConflict", "Registration"]


def test_registration_tokens_when_configured(make_settings: Any, r: redis.Redis) -> None:
    registry = Registry(r, make_settings(registration_tokens=["alpha", "beta"]))
    for token in (None, "", "gamma"):
        with pytest.raises(Unauthorized):
            register(registry, registration_token=token)
    assert list(r.scan_iter(match="{dispatcher}*")) == [], "nothing about a refused node is stored"
    assert register(registry, registration_token="beta").status == "registering"


def test_model_status_is_case_insensitive() -> None:
    msg = NodeRegister.model_validate_json(
        '{"type": "node_register", "installed_models": [{"model_id": "w", "status": "Ready"}]}')
    assert msg.installed_models[0].status == "ready"
