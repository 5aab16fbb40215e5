"""web/admission.py alone: who may wait to register (a bound per address and in all, room made
for an address holding few), where a connection comes from behind proxies, and the WSGI layer
that refuses before Flask."""

from __future__ import annotations

from typing import Any

import pytest

from web.admission import Admission, WaitingRoom, client_address


class Session:
    """A waiting session as the room sees one: something it may close."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed: tuple[int, str] | None = None

    def close(self, code: int = 1000, reason: str = "", why: str | None = None) -> None:
        self.closed = (code, reason)


def fill(room: WaitingRoom, address: str, count: int) -> list[Session]:
    sessions = []
    for i in range(count):
        assert room.refusal(address) is None
        session = Session(f"{address}-{i}")
        room.enter(session, address)
        sessions.append(session)
    return sessions


def test_an_address_may_hold_only_so_many_waiting_sessions() -> None:
    room = WaitingRoom(per_address=2, total=10)
    first, _ = fill(room, "10.0.0.1", 2)
    assert room.refusal("10.0.0.1") == "too many sessions waiting to register from 10.0.0.1; try again later"
    assert room.refusal("10.0.0.2") is None, "another address is not held back"
    room.leave(first, "10.0.0.1")  # registered
    room.leave(first, "10.0.0.1")  # and its end later changes nothing
    assert room.held("10.0.0.1") == 1 and room.count == 1 and room.refusal("10.0.0.1") is None


def test_when_full_the_fullest_address_makes_room_for_one_holding_fewer() -> None:
    room = WaitingRoom(per_address=3, total=4)
    crowd = fill(room, "attacker", 3)
    fill(room, "other", 1)
    assert room.refusal("node") is None, "room made: the newcomer holds none, the fullest three"
    assert crowd[0].closed == (1008, "too many sessions waiting to register"), "its longest-waiting one"
    assert [s.closed for s in crowd[1:]] == [None, None]
    assert (room.count, room.held("attacker")) == (3, 2)
    room.enter(Session("node-0"), "node")
    assert room.refusal("other") == "too many sessions waiting to register; try again later", \
        "full again, and no address holds two more than it"


@pytest.mark.parametrize(("hops", "forwarded", "expected"), [
    (0, "6.6.6.6", "10.1.1.1"),  # no proxy trusted: the header is anyone's to write
    (1, "6.6.6.6, 203.0.113.9", "203.0.113.9"),  # what our one proxy appended
    (2, "6.6.6.6, 203.0.113.9, 10.0.0.2", "203.0.113.9"),
    (2, "203.0.113.9", "10.1.1.1"),  # fewer entries than proxies: not to be trusted
])
def test_the_client_address_behind_trusted_proxies(hops: int, forwarded: str, expected: str) -> None:
    assert client_address({"REMOTE_ADDR": "10.1.1.1", "HTTP_X_FORWARDED_FOR": forwarded}, hops) == expected


def test_the_wsgi_layer_refuses_before_the_app_and_drops_compression(plain_settings: Any) -> None:
    seen: list[dict[str, Any]] = []
    refused: list[tuple[int, str]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ)
        start_response("200 OK", [])
        return [b"app"]

    def refuse(address: str, origin: str | None) -> tuple[int, str] | None:
        return (403, f"origin {origin} not allowed") if origin == "https://evil.example" else None
    layer = Admission(app, "/ws/node", plain_settings(trusted_proxy_hops=1), refuse,
                      lambda status, why: refused.append((status, why)))
    answered: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answered.append((status, dict(headers)))
    body = layer({"PATH_INFO": "/ws/node", "REMOTE_ADDR": "10.0.0.9", "HTTP_X_FORWARDED_FOR": "198.51.100.7",
                  "HTTP_ORIGIN": "https://evil.example"}, start_response)
    assert body == [b"origin https://evil.example not allowed\n"] and seen == []
    assert answered[-1][0] == "403 Forbidden" and answered[-1][1]["Retry-After"] == "5"
    assert refused == [(403, "origin https://evil.example not allowed")]

    assert layer({"PATH_INFO": "/ws/node", "REMOTE_ADDR": "10.0.0.9", "HTTP_X_FORWARDED_FOR": "198.51.100.7",
                  "HTTP_SEC_WEBSOCKET_EXTENSIONS": "permessage-deflate"}, start_response) == [b"app"]
    assert seen[-1]["dispatcher.client_address"] == "198.51.100.7"
    assert "HTTP_SEC_WEBSOCKET_EXTENSIONS" not in seen[-1], "permessage-deflate is never negotiated"
    assert layer({"PATH_INFO": "/api/nodes", "HTTP_ORIGIN": "https://evil.example"}, start_response) == [b"app"], \
        "only the node endpoint is guarded"
