"""Script calls from many sessions sent to Redis together.

A web process holding 10,000 node sessions makes hundreds of script calls a
second, each from its session's greenlet. One by one, every call checks a
connection out of the pool (with a readiness poll), writes, waits and wakes
its greenlet: over 40% of the process's CPU in a restart storm, and the pool
became the queue (calls that waited 10 s for a connection failed, and their
nodes registered again). Here the calls waiting at one moment go out as one
pipeline on one connection, from a few flusher threads (greenlets under
gevent): a call waits at most for the batches ahead of it.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

#: Calls sent in one pipeline at most.
MAX_BATCH = 200
#: Pipelines in flight at once (each holds one pool connection while it runs).
FLUSHERS = 4


#: A call's result before its reply came.
_UNSET = object()


class _Call:
    __slots__ = ("script", "command", "done", "result", "error")

    def __init__(self, script: Script | None, command: tuple[Any, ...]) -> None:
        #: The script when the command is its EVALSHA (loaded again after a NOSCRIPT).
        self.script = script
        self.command = command
        self.done = threading.Event()
        self.result: Any = _UNSET
        self.error: BaseException | None = None


class ScriptBatcher:
    """Runs script calls for any number of callers, grouped into pipelines."""

    def __init__(self, client: redis.Redis, max_batch: int = MAX_BATCH, flushers: int = FLUSHERS) -> None:
        self._client = client
        self._max_batch = max_batch
        self._flushers = flushers
        self._pending: deque[_Call] = deque()
        self._ready = threading.Condition()
        self._started = False

    def call(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """The script's reply, as ``script(keys, args)`` would give it (and its errors)."""
        return self._wait(_Call(script, ("EVALSHA", script.sha, len(keys), *keys, *args)))

    def command(self, *command: Any) -> Any:
        """The reply to one plain command, e.g. ``command("HMGET", key, field)``."""
        return self._wait(_Call(None, command))

    def _wait(self, call: _Call) -> Any:
        with self._ready:
            if not self._started:  # after a fork: started by the process that uses it
                self._started = True
                for i in range(self._flushers):
                    threading.Thread(target=self._flush, name=f"script-batcher-{i}", daemon=True).start()
            self._pending.append(call)
            self._ready.notify()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _flush(self) -> None:
        while True:
            with self._ready:
                while not self._pending:
                    self._ready.wait()
                batch = [self._pending.popleft() for _ in range(min(self._max_batch, len(self._pending)))]
            try:
                self._send(batch)
            except BaseException as exc:  # every caller still waiting gets it; the flusher lives on
                for call in batch:
                    if call.error is None and call.result is _UNSET:
                        call.error = exc
                if not isinstance(exc, Exception):
                    raise  # the greenlet or thread is being stopped
            finally:
                for call in batch:
                    call.done.set()

    def _send(self, batch: list[_Call], load_missing: bool = True) -> None:
        pipe = self._client.pipeline(transaction=False)
        for call in batch:
            pipe.execute_command(*call.command)
        replies = pipe.execute(raise_on_error=False)
        unloaded = []
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                # A reply, not a failure here: its traceback (the parser's frames, which refer
                # back to it) would only make a cycle that web/gcpolicy.py may freeze.
                reply.__traceback__ = None
            if isinstance(reply, NoScriptError) and call.script is not None and load_missing:
                unloaded.append(call)
            elif isinstance(reply, Exception):
                call.error = reply
            else:
                call.result = reply
        if unloaded:
            # After a flush or a restart: each script is loaded once, then its calls go again.
            for script in {id(call.script): call.script for call in unloaded}.values():
                assert script is not None
                script.sha = self._client.script_load(script.script)
            self._send(unloaded, load_missing=False)
