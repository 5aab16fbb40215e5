"""The reference node agent: one WebSocket session at a time, reconnecting for ever.

Per session: register (resuming with the saved node_id and secret), then
heartbeat every ``heartbeat_interval_seconds`` (as the ack says), log every
node_status, run assigned jobs and send their results. Frames produced while
disconnected (job results) wait in the outbox for the next session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from dispatcher.agent.journal import JobJournal
from dispatcher.agent.probe import Probe
from dispatcher.agent.runner import Handler, JobRunner
from dispatcher.agent.state import Identity, StateFile
from dispatcher.messages import (
    DecodeError,
    ErrorMessage,
    JobAssign,
    JobCancel,
    NodeRegisterAck,
    NodeStatusMessage,
    decode_server_message,
)

log = logging.getLogger("dispatcher.agent")

AGENT_VERSION = "dispatcher-agent/0.1.0"


class Fatal(Exception):
    """Raised when reconnecting cannot help (a refused registration token)."""


class _Reconnect(Exception):
    """Raised to end the session and register again."""


@dataclass
class AgentConfig:
    url: str
    state_path: Path
    models: dict[str, str] = field(default_factory=dict)
    #: A JSON file {"model_id": "status"} re-read before every heartbeat, when given.
    models_file: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)
    max_concurrent_jobs: int = 1
    accept_public_jobs: bool = False
    registration_token: str | None = None
    reconnect_base_s: float = 0.5
    reconnect_max_s: float = 30.0
    #: A session that lasted this long resets the backoff.
    stable_session_s: float = 30.0


class NodeAgent:
    def __init__(self, config: AgentConfig, handler: Handler, probe: Probe | None = None) -> None:
        self.config = config
        self.state = StateFile(config.state_path)
        self.probe = probe or Probe()
        journal = JobJournal(config.state_path.with_name(config.state_path.name + ".jobs"))
        self.runner = JobRunner(handler, config.max_concurrent_jobs, self._send_threadsafe, journal)
        self.status: str | None = None
        self.node_id: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: asyncio.Queue[dict[str, Any]] | None = None
        self._stopping = asyncio.Event()
        self._draining = False

    # --- the reconnect loop --------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._outbox = asyncio.Queue()
        failures = 0
        while not self._stopping.is_set():
            started_s = time.monotonic()
            try:
                async with connect(self.config.url, max_size=None, open_timeout=10) as ws:
                    await self._session(ws)
            except Fatal:
                raise
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake, _Reconnect) as exc:
                # An undrain of a drained node closes its session on purpose: it registers again.
                asked = isinstance(exc, ConnectionClosed) and exc.rcvd is not None and exc.rcvd.code == 4002 \
                    and exc.rcvd.reason.startswith("drain ended")
                log.log(logging.INFO if asked else logging.WARNING, "session ended",
                        extra={"event": "session_ended", "error": f"{type(exc).__name__}: {exc}"})
            except InvalidURI as exc:
                raise Fatal(str(exc)) from exc
            if self._stopping.is_set():
                break
            failures = 0 if time.monotonic() - started_s > self.config.stable_session_s else failures + 1
            # Full jitter: a fleet that lost the server together does not come back in step.
            delay_s = random.uniform(0, min(self.config.reconnect_max_s, self.config.reconnect_base_s * 2 ** failures))
            log.info("reconnecting", extra={"event": "reconnecting", "in_s": round(delay_s, 2)})
            try:
                await asyncio.wait_for(self._stopping.wait(), delay_s)
            except TimeoutError:
                pass

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Ask to be drained, let running jobs finish (up to the timeout), then stop."""
        if self._draining or self.status not in ("ready", "degraded"):
            self._stopping.set()
            return
        self._draining = True
        self._send({"type": "node_drain", "reason": "agent shutting down"})
        await asyncio.to_thread(self.runner.wait_idle, drain_timeout_s)
        await asyncio.sleep(0.2)  # let the last results leave
        self._stopping.set()

    # --- one session ---------------------------------------------------------

    async def _session(self, ws: ClientConnection) -> None:
        identity = self.state.load()
        await ws.send(json.dumps(self._register_frame(identity)))
        ack = await self._await_ack(ws)
        self.node_id, self.status = ack.node_id, ack.status.value
        self.state.save(Identity(ack.node_id, ack.node_secret))
        log.info("registered", extra={"event": "registered", "node_id": ack.node_id, "resumed": ack.node_id == identity.node_id,
                                      "status": self.status})
        tasks = [asyncio.create_task(self._heartbeats(ws, ack.heartbeat_interval_seconds)),
                 asyncio.create_task(self._sender(ws)),
                 asyncio.create_task(self._stopping.wait())]
        receiver = asyncio.create_task(self._receive(ws))
        try:
            done, _ = await asyncio.wait([receiver, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in (receiver, *tasks):
                task.cancel()
            self.status = None

    def _register_frame(self, identity: Identity) -> dict[str, Any]:
        return {
            "type": "node_register",
            "node_id": identity.node_id,
            "node_secret": identity.node_secret,
            "registration_token": self.config.registration_token,
            "version": AGENT_VERSION,
            "capability_schema_version": "1.0",
            "hardware": self.probe.hardware(),
            "installed_models": self._models(),
            "accept_public_jobs": self.config.accept_public_jobs,
            "max_concurrent_jobs": self.config.max_concurrent_jobs,
            "labels": self.config.labels,
        }

    async def _await_ack(self, ws: ClientConnection) -> NodeRegisterAck:
        while True:
            msg = decode_server_message(await asyncio.wait_for(ws.recv(), 30))
            if isinstance(msg, NodeRegisterAck):
                return msg
            if isinstance(msg, ErrorMessage):
                if msg.code == "NODE_ID_CONFLICT":
                    # The contract's remedy: forget the id and register as a new node.
                    log.warning("node_id refused; registering as a new node",
                                extra={"event": "identity_cleared", "why": msg.message})
                    self.state.clear()
                    raise _Reconnect(msg.message)
                if msg.code == "UNAUTHORIZED":
                    raise Fatal(f"registration refused: {msg.message}")
                raise _Reconnect(f"{msg.code.value}: {msg.message}")

    async def _heartbeats(self, ws: ClientConnection, interval_s: float) -> None:
        while True:
            frame = {
                "type": "node_heartbeat",
                "node_id": self.node_id,
                "timestamp": int(time.time() * 1000),
                "resource_usage": self.probe.usage(len(self.runner.running_job_ids())),
                "installed_models": self._models(),
                "gpu_available": self.probe.gpu_available(),
            }
            await ws.send(json.dumps(frame))
            await asyncio.sleep(interval_s)

    async def _sender(self, ws: ClientConnection) -> None:
        assert self._outbox is not None
        while True:
            frame = await self._outbox.get()
            try:
                await ws.send(json.dumps(frame))
            except ConnectionClosed:
                self._outbox.put_nowait(frame)  # keep it for the next session
                raise

    async def _receive(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                msg = decode_server_message(raw)
            except DecodeError as exc:
                log.warning("unreadable frame from the server", extra={"event": "bad_frame", "error": str(exc)})
                continue
            if isinstance(msg, NodeStatusMessage):
                self._on_status(msg)
            elif isinstance(msg, JobAssign):
                self.runner.assign(msg)
            elif isinstance(msg, JobCancel):
                self.runner.cancel(msg.job_id, msg.attempt, msg.reason)
            elif isinstance(msg, ErrorMessage):
                log.warning("server error", extra={"event": "server_error", "code": msg.code.value,
                                                   "detail": msg.message, "ref_type": msg.ref_type})

    def _on_status(self, msg: NodeStatusMessage) -> None:
        known, self.status = self.status, msg.status.value
        if msg.periodic:
            # The current status again (its previous_status and reason are the last transition's):
            # news only when it differs from what we heard, a transition sent while we were away.
            level = logging.DEBUG if msg.status.value == known else logging.INFO
            event = "node_status_report"
        else:
            level, event = logging.INFO, "node_status"
        log.log(level, "node status", extra={
            "event": event, "node_id": msg.node_id, "status": msg.status.value,
            "previous_status": msg.previous_status.value if msg.previous_status else None, "reason": msg.reason,
            "assigned_jobs": msg.assigned_jobs, "not_eligible": msg.not_eligible})

    # --- outgoing frames -------------------------------------------------------

    def _send(self, frame: dict[str, Any]) -> None:
        assert self._outbox is not None
        self._outbox.put_nowait(frame)

    def _send_threadsafe(self, frame: dict[str, Any]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._send, frame)

    def _models(self) -> list[dict[str, str]]:
        models = dict(self.config.models)
        if self.config.models_file is not None:
            try:
                models.update(json.loads(self.config.models_file.read_text()))
            except (OSError, ValueError) as exc:
                log.warning("cannot read the models file", extra={"event": "models_file_unreadable", "error": str(exc)})
        return [{"model_id": model_id, "status": status} for model_id, status in sorted(models.items())]
