"""The reference node agent: one WebSocket session at a time, reconnecting for ever.

Per session: register (resuming with the saved node_id and secret), then
heartbeat every ``heartbeat_interval_seconds`` (as the ack says), log every
node_status, run assigned jobs and send their results. Frames produced while
disconnected (job results) wait in the outbox for the next session. Every frame it
sends is a model of ``dispatcher.messages``, written by the model (``encode()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from dispatcher.agent.journal import JobJournal
from dispatcher.agent.probe import Probe
from dispatcher.agent.runner import Handler, JobRunner
from dispatcher.agent.state import Identity, StateFile
from dispatcher.messages import (
    MAX_MODELS,
    DecodeError,
    ErrorMessage,
    Hardware,
    InstalledModel,
    JobAssign,
    JobCancel,
    NodeDrain,
    NodeHeartbeat,
    NodeMessage,
    NodeRegister,
    NodeRegisterAck,
    NodeStatusMessage,
    decode_server_message,
    describe_validation_error,
)
from dispatcher.vocabulary import CloseCode

log = logging.getLogger("dispatcher.agent")

AGENT_VERSION = "dispatcher-agent/0.1.0"

#: The frames the runner hands over (job_ack, job_progress, job_result) as JSON objects, back to their models.
_node_frames: TypeAdapter[NodeMessage] = TypeAdapter(NodeMessage)


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

    def __post_init__(self) -> None:
        # What the server would refuse in every node_register (a label, a model, the token), refused
        # now, naming the field, rather than by the server on every reconnection.
        models = installed_models(self.models)
        try:
            register_frame(self, Identity(), models)
        except ValidationError as exc:
            raise ValueError(describe_validation_error(exc)) from None


def installed_models(models: dict[str, str]) -> list[InstalledModel]:
    """``{model_id: status}`` as the frames carry it (a status in any case, as the server reads
    it); raises ValueError naming the first model the contract refuses."""
    listed = []
    for model_id, status in sorted(models.items()):
        try:
            # Not strict: the status is text, which the model's own validator reads in any case.
            listed.append(InstalledModel.model_validate({"model_id": model_id, "status": status}, strict=False))
        except ValidationError as exc:
            raise ValueError(f"model {str(model_id)[:128]!r}: {describe_validation_error(exc)}") from None
    return listed


def register_frame(config: AgentConfig, identity: Identity, models: list[InstalledModel],
                   hardware: Hardware | None = None) -> NodeRegister:
    """The first frame of a session: this node as configured, resuming with ``identity`` when it has one."""
    return NodeRegister(
        type="node_register", node_id=identity.node_id, node_secret=identity.node_secret,
        registration_token=config.registration_token, version=AGENT_VERSION, capability_schema_version="1.0",
        hardware=hardware or Hardware(), installed_models=models, accept_public_jobs=config.accept_public_jobs,
        max_concurrent_jobs=config.max_concurrent_jobs, labels=config.labels)


def reconnect_delay_s(failures: int, base_s: float, max_s: float, heartbeat_interval_s: float | None) -> float:
    """How long to wait before the next try, after ``failures`` short sessions in a row.

    Full jitter: a fleet that lost the server together does not come back in step. Never
    longer than the heartbeat interval once the server said it: a node away longer is
    declared offline and its jobs wait only ``job_reassign_grace_seconds`` for it, so
    a short outage (Redis restarting, a web process replaced) must not grow the backoff
    past them. The price: during a long outage the fleet tries about twice an interval
    (the jitter's mean is half the cap), a handshake rate of the order of its heartbeats.
    """
    cap_s = max_s if heartbeat_interval_s is None else min(max_s, heartbeat_interval_s)
    return random.uniform(0, min(cap_s, base_s * 2 ** failures))


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
        self._outbox: asyncio.Queue[NodeMessage] | None = None
        self._stopping = asyncio.Event()
        self._draining = False
        #: As the last node_register_ack said (None until one came).
        self._heartbeat_interval_s: float | None = None

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
                closed = exc.rcvd if isinstance(exc, ConnectionClosed) else None
                asked = closed is not None and closed.code == CloseCode.NODE_OFFLINE \
                    and closed.reason.startswith("drain ended")
                log.log(logging.INFO if asked else logging.WARNING, "session ended",
                        extra={"event": "session_ended", "error": f"{type(exc).__name__}: {exc}"})
            except InvalidURI as exc:
                raise Fatal(str(exc)) from exc
            if self._stopping.is_set():
                break
            failures = 0 if time.monotonic() - started_s > self.config.stable_session_s else failures + 1
            delay_s = reconnect_delay_s(failures, self.config.reconnect_base_s, self.config.reconnect_max_s,
                                        self._heartbeat_interval_s)
            log.info("reconnecting", extra={"event": "reconnecting", "in_s": round(delay_s, 2)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay_s)

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Ask to be drained, let running jobs finish (up to the timeout), then stop."""
        if self._draining or self.status not in ("ready", "degraded"):
            self._stopping.set()
            return
        self._draining = True
        self._send(NodeDrain(type="node_drain", reason="agent shutting down"))
        await asyncio.to_thread(self.runner.wait_idle, drain_timeout_s)
        await asyncio.sleep(0.2)  # let the last results leave
        self._stopping.set()

    # --- one session ---------------------------------------------------------

    async def _session(self, ws: ClientConnection) -> None:
        identity = self.state.load()
        await ws.send(register_frame(self.config, identity, self._models(), self.probe.hardware()).encode())
        ack = await self._await_ack(ws)
        self.node_id, self.status = ack.node_id, ack.status.value
        self._heartbeat_interval_s = ack.heartbeat_interval_seconds
        self.state.save(Identity(ack.node_id, ack.node_secret))
        log.info("registered", extra={"event": "registered", "node_id": ack.node_id,
                                      "resumed": ack.node_id == identity.node_id, "status": self.status})
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
            frame = NodeHeartbeat(type="node_heartbeat", node_id=self.node_id, timestamp=int(time.time() * 1000),
                                  resource_usage=self.probe.usage(len(self.runner.running_job_ids())),
                                  installed_models=self._models(), gpu_available=self.probe.gpu_available())
            await ws.send(frame.encode())
            await asyncio.sleep(interval_s)

    async def _sender(self, ws: ClientConnection) -> None:
        assert self._outbox is not None
        while True:
            frame = await self._outbox.get()
            try:
                await ws.send(frame.encode())
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

    def _send(self, frame: NodeMessage) -> None:
        assert self._outbox is not None
        self._outbox.put_nowait(frame)

    def _send_threadsafe(self, frame: dict[str, Any]) -> None:
        """The runner's way out, from its threads: a frame as its model's JSON object (what the
        runner's journal keeps), made that model again here and sent as the model writes it."""
        assert self._loop is not None
        try:
            message = _node_frames.validate_python(frame)
        except ValidationError as exc:  # a journal written by another version of the agent
            log.error("frame not sent: the contract refuses it", extra={
                "event": "frame_refused", "type": str(frame.get("type")), "error": describe_validation_error(exc)})
            return
        self._loop.call_soon_threadsafe(self._send, message)

    def _models(self) -> list[InstalledModel]:
        models = installed_models(self.config.models)  # checked at start (AgentConfig)
        if self.config.models_file is None:
            return models
        try:
            listed = json.loads(self.config.models_file.read_text())
            if not isinstance(listed, dict):
                raise ValueError('not a JSON object {"model_id": "status"}')
        except (OSError, ValueError) as exc:
            log.warning("cannot read the models file", extra={"event": "models_file_unreadable", "error": str(exc)})
            return models
        found = {model.model_id: model for model in models}
        for model_id, status in listed.items():
            try:
                (found[model_id],) = installed_models({model_id: status})
            except ValueError as exc:
                # Left out rather than sent: the server would refuse the whole heartbeat.
                log.warning("a model of the models file is left out",
                            extra={"event": "models_file_invalid", "error": str(exc)})
        if len(found) > MAX_MODELS:
            log.warning("too many models: the first ones only are reported",
                        extra={"event": "models_file_too_long", "models": len(found), "reported": MAX_MODELS})
        return [found[model_id] for model_id in sorted(found)[:MAX_MODELS]]
