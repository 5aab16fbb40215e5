"""Who may open a node session, decided before the WebSocket handshake.

A refused client costs one short HTTP answer, given by a WSGI layer in front
of Flask (no request context, no routing): an attacker with many addresses
hammering the endpoint spends our CPU on as little as possible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from dispatcher.settings import Settings
from dispatcher.vocabulary import CloseCode


class Closable(Protocol):
    def close(self, code: int = CloseCode.NORMAL, reason: str = "", why: str | None = None) -> None: ...


class WaitingRoom:
    """Sessions that have not registered yet, by client address, bounded per address
    (past it: refused) and in all. Past the total, the address holding the most makes
    room, its longest-waiting session closed (1008), for a newcomer from an address
    holding at least two fewer; otherwise the newcomer is refused. So attackers spread
    over many addresses cannot keep out a node from an address of its own, nor make the
    process accept (and close) sessions as fast as they can reconnect."""

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total = total
        self.count = 0
        #: Address -> its waiting sessions, oldest first.
        self._by_address: dict[str, dict[Closable, None]] = {}
        #: How many waiting sessions -> the addresses holding that many (to find the fullest at once).
        self._addresses_holding: list[set[str]] = [set() for _ in range(per_address + 1)]

    def held(self, address: str) -> int:
        return len(self._by_address.get(address, ()))

    def refusal(self, address: str) -> str | None:
        """Why a new session from ``address`` may not wait to register, or None (making room when full)."""
        held = self.held(address)
        if held >= self.per_address:
            return f"too many sessions waiting to register from {address}; try again later"
        if self.count < self.total:
            return None
        fullest = next(a for n in range(self.per_address, 0, -1) for a in self._addresses_holding[n])
        if self.held(fullest) - held < 2:
            return "too many sessions waiting to register; try again later"
        victim = next(iter(self._by_address[fullest]))
        self.leave(victim, fullest)
        victim.close(CloseCode.POLICY, "too many sessions waiting to register", why="made room for another address")
        return None

    def enter(self, session: Closable, address: str) -> None:
        sessions = self._by_address.setdefault(address, {})
        self._move(address, len(sessions), len(sessions) + 1)
        sessions[session] = None
        self.count += 1

    def leave(self, session: Closable, address: str) -> None:
        """The session registered or ended (or made room); nothing when it had left already."""
        sessions = self._by_address.get(address)
        if sessions is None or session not in sessions:
            return
        del sessions[session]
        self._move(address, len(sessions) + 1, len(sessions))
        if not sessions:
            del self._by_address[address]
        self.count -= 1

    def _move(self, address: str, before: int, after: int) -> None:
        if before:
            self._addresses_holding[before].discard(address)
        if after:
            self._addresses_holding[after].add(address)


def client_address(environ: dict[str, Any], trusted_proxy_hops: int) -> str:
    """The address a connection comes from: the peer's, or, behind ``trusted_proxy_hops``
    proxies that append to X-Forwarded-For, the entry the outermost one added."""
    if trusted_proxy_hops:
        forwarded = [a.strip() for a in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if a.strip()]
        if len(forwarded) >= trusted_proxy_hops:
            return forwarded[-trusted_proxy_hops][:64]
    return str(environ.get("REMOTE_ADDR") or "unknown")


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Admission:
    """WSGI middleware: a request for ``path`` is checked by ``refuse(address, origin)``
    (None to let it through, or an HTTP status and reason) before Flask sees it."""

    def __init__(self, app: WsgiApp, path: str, settings: Settings,
                 refuse: Callable[[str, str | None], tuple[int, str] | None],
                 on_refused: Callable[[int, str], None]) -> None:
        self.app = app
        self.path = path
        self.trusted_proxy_hops = settings.trusted_proxy_hops
        self.refuse = refuse
        self.on_refused = on_refused

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == self.path:
            address = client_address(environ, self.trusted_proxy_hops)
            environ["dispatcher.client_address"] = address
            refused = self.refuse(address, environ.get("HTTP_ORIGIN"))
            if refused is not None:
                status, why = refused
                self.on_refused(status, why)
                body = (why + "\n").encode()
                start_response(f"{status} {'Forbidden' if status == 403 else 'Service Unavailable'}", [
                    ("Content-Type", "text/plain"), ("Content-Length", str(len(body))), ("Retry-After", "5"),
                    ("Connection", "close")])
                return [body]
            # No permessage-deflate: its zlib state costs about 300 KiB per session, and a
            # small compressed frame could inflate without bound before any size limit.
            environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
            try:
                return self.app(environ, start_response)
            finally:
                # werkzeug's request and this environ refer to each other: a cycle that, once
                # frozen with a long session (web/gcpolicy.py), no collection would free.
                environ.pop("werkzeug.request", None)
        return self.app(environ, start_response)
