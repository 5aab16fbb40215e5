"""Delivery of frames to node sessions: per-node queues in Redis, and the wake-ups.

Producers (the scripts) push a frame on the node's queue and publish the node id
on the wake channel, in one atomic step. Each web process runs one
``WakeListener`` for all its sessions; a woken session pops its queue without
blocking. A periodic sweep catches any wake-up lost while the listener was
reconnecting. So thousands of sessions share one subscription and a bounded
pool, and no session holds a blocking Redis call.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Literal

import redis

from dispatcher.errors import StoreError
from dispatcher.keys import Keys
from dispatcher.logs import log_event
from dispatcher.scripts import Reply, Scripts
from dispatcher.store import store_client

log = logging.getLogger("dispatcher.delivery")

#: Frames one pop takes from a node's queue.
POP_BATCH = 100


class Outbox:
    """The node queues, seen from the process that holds the sessions (its calls raise
    StoreError, never redis-py's errors)."""

    def __init__(self, client: redis.Redis, scripts: Scripts, keys: Keys) -> None:
        self.client = store_client(client)
        self.scripts = scripts
        self.keys = keys

    def pop(self, node_id: str, session_id: str, max_bytes: int) -> list[str] | Literal[Reply.SUPERSEDED]:
        """Frames for the node, oldest first, about ``max_bytes`` at most (so that what
        a session holds in memory stays bounded; the rest waits in Redis); SUPERSEDED when
        another session holds the node."""
        return self.scripts.pop_frames(node_id, session_id, POP_BATCH, max_bytes)

    def pending(self, node_ids: Iterable[str]) -> list[str]:
        """The nodes among ``node_ids`` with frames waiting (one round trip)."""
        ids = list(node_ids)
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for node_id in ids:
            pipe.llen(self.keys.queue(node_id))
        return [node_id for node_id, length in zip(ids, pipe.execute(), strict=True) if length]


#: Queued frames starting with this are instructions for the web process, not frames for the node.
CONTROL_PREFIX = "!"


def parse_control(frame: str) -> tuple[str, int, str]:
    """``!close 4002 reason text`` -> ("close", 4002, "reason text")."""
    verb, _, rest = frame[len(CONTROL_PREFIX):].partition(" ")
    code, _, reason = rest.partition(" ")
    return verb, int(code or 1000), reason


class WakeListener:
    """One subscription per process to the wake channel.

    ``on_wake(node_id)`` runs on the listener's thread (a greenlet under
    gevent) and must not block; ``on_reconnect()`` runs after every
    (re)subscription, to sweep for what was published meanwhile (a StoreError
    it raises makes the listener subscribe again, as a lost subscription does).
    """

    def __init__(self, client: redis.Redis, keys: Keys, on_wake: Callable[[str], None],
                 on_reconnect: Callable[[], None]) -> None:
        self.client = client
        self.keys = keys
        self.on_wake = on_wake
        self.on_reconnect = on_reconnect
        self._stop = threading.Event()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="wake-listener", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        backoff_s = 0.1
        while not self._stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.keys.wake_channel())
                # Anything published while we were away is found by a sweep now.
                self.on_reconnect()
                backoff_s = 0.1
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self.on_wake(message["data"])
            except (redis.RedisError, StoreError) as exc:  # the subscription's own, or the sweep's
                log_event(log, "wake_listener_reconnect", logging.WARNING, error=str(exc), backoff_s=backoff_s)
                time.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()
