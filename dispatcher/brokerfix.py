"""A workaround for a kombu bug that stops a Celery worker when Redis restarts, and a
Redis connection saved per publishing channel.

Imported for its effect by ``dispatcher.celery_app`` (worker and beat).

The bug (kombu 5.7.0, ``kombu/transport/redis.py``; celery/kombu#970, #582)
---------------------------------------------------------------------------
When Redis goes away, the worker's consumer calls ``Connection.collect()`` and
then ``Connection.close()`` (celery/worker/consumer/consumer.py:476 and :487).

1. ``collect()`` closes the default channel, the one consuming tasks. If its
   BRPOP is outstanding (the loss was seen first on the pub/sub socket),
   ``Channel.close`` first reads that reply (redis.py:1894), the read fails,
   and the close stops there: the channel stays open, with its prefetched,
   unacknowledged messages.
2. ``collect()`` then closes the transport's other channels; the first one
   that fails (the fanout channel's ``queue_delete``, redis.py:1906) ends the
   loop (``Transport.close_connection``, virtual/base.py:997), and the default
   channel is left open again.
3. ``collect()`` clears ``Transport.client`` (kombu/connection.py:429) but not
   the connection's ``_default_channel``.
4. ``close()`` closes that default channel once more (connection.py:412). Its
   pools are dropped (redis.py:1907), then its unacknowledged messages are
   restored: ``virtual.Channel.close`` -> ``QoS.restore_unacked_once``
   (virtual/base.py:806, :300) -> ``redis.QoS.restore_unacked``
   (redis.py:494) -> ``conn_or_acquire`` -> ``_create_client`` -> ``pool`` ->
   ``_get_pool`` -> ``_connparams``, which reads
   ``self.connection.client.hostname`` (redis.py:1957-1959) on ``None``.

The ``AttributeError`` is not a connection error, so nothing on the way
catches it and the worker exits with "Unrecoverable error". It takes unacked
messages held with the BRPOP outstanding when Redis dies (an idle queue, tasks
waiting for their ETA or a pool process): then it happened on every restart we
tried; with a busy queue, about one restart in twenty. Had the restore been skipped, the next crash
is the same: a prefetched task of that channel ending afterwards acks it
(``redis.QoS.ack`` -> ``_remove_from_indices`` -> ``conn_or_acquire``,
redis.py:500, :515), finds no pool, and reaches ``_connparams`` with
``self.connection`` now ``None``. tests/test_broker_restarts.py reproduces it.

The workaround
--------------
``Channel._connparams`` checks first that the channel's connection is still
there; if it is gone, it logs a ``broker_channel_gone`` warning and raises
``BrokerConnectionGone``, a ``redis.ConnectionError``, instead of the
``AttributeError``: the error a Redis that went away gives. Every caller on
those paths already handles that one: ``Connection.close`` ignores it while
closing channels, and Celery logs "Couldn't ack" and goes on. Nothing else
changes: a channel whose connection is open never takes that branch.

What happens to the messages: none of them is lost. Each one is still in kombu's
``unacked`` hash in Redis (written when it was delivered; with
``appendfsync always`` it survives the restart). kombu's ``restore_visible``
(swept by the worker about every 100 s) puts it back on its queue once it is
older than ``visibility_timeout`` (300 s, celeryconfig.py), and a worker runs
it again: our tasks are idempotent. That is what already happens to them
whenever the restore or the ack fails because Redis is down.

A connection saved: the channel's first ping
---------------------------------------------
A new channel checks Redis with a PING on its asynchronous pool (redis.py:1201),
the pool its BRPOP and pub/sub use. A channel that only publishes (Celery's
producers, the task events of every process) never uses that pool again, yet
keeps the connection open: one idle Redis connection per publishing channel in
every process (web, beat, each worker pool process), against a managed Redis's
cap on clients (docs/operations.md, the connection budget). Here the PING goes
through the channel's ordinary pool instead, whose connection the channel's
publishes then reuse; a consuming channel opens its asynchronous connection
with its first BRPOP, as before. The check itself is the same command.

When to remove it: once kombu's Redis channel no longer builds a pool from
``Transport.client`` after ``collect()`` (or ``collect()`` resets
``_default_channel`` and closes every channel). It applies to kombu 5.7.0
only; with any other version it logs ``brokerfix_skipped`` and changes
nothing: run tests/test_broker_restarts.py against that version, then update
or drop this module.
"""

from __future__ import annotations

import logging
from typing import Any

import kombu
import redis
from kombu.transport import redis as kombu_redis

from dispatcher.logs import log_event

log = logging.getLogger("dispatcher.brokerfix")

#: The kombu version the bug was studied on.
KOMBU_VERSION = "5.7.0"

_original_connparams = kombu_redis.Channel._connparams


class BrokerConnectionGone(redis.ConnectionError):
    """A channel of a broker connection that was closed needed a new Redis client."""


def _connparams(self: kombu_redis.Channel, asynchronous: bool = False) -> dict[str, Any]:
    transport = self.connection
    if transport is None or transport.client is None:
        qos = self._qos
        log_event(log, "broker_channel_gone", logging.WARNING, channel_id=self.channel_id,
                  unacked=len(qos._delivered) if qos is not None else 0,
                  detail="its connection was closed after a broker connection loss; unacked messages stay "
                         "in kombu's unacked hash and restore_visible requeues them after visibility_timeout")
        raise BrokerConnectionGone("the channel's broker connection is closed")
    return _original_connparams(self, asynchronous)


_original_init = kombu_redis.Channel.__init__


class _PingThroughPool:
    """Stands in for a channel's asynchronous client while it is made: its PING goes through
    the channel's ordinary pool."""

    def __init__(self, channel: kombu_redis.Channel) -> None:
        self.channel = channel

    def ping(self) -> Any:
        return self.channel._create_client().ping()


def _init(self: kombu_redis.Channel, *args: Any, **kwargs: Any) -> None:
    # ``client`` is a cached property: set in the instance, it is what __init__ pings; removed
    # after, the asynchronous client is made on its first real use (a BRPOP).
    self.__dict__["client"] = _PingThroughPool(self)
    try:
        _original_init(self, *args, **kwargs)
    finally:
        self.__dict__.pop("client", None)


def apply() -> bool:
    """Patch kombu's Redis channel; False (and a warning) with any kombu but the one it was written for."""
    if kombu.__version__ != KOMBU_VERSION:
        log_event(log, "brokerfix_skipped", logging.WARNING, kombu_version=kombu.__version__,
                  written_for=KOMBU_VERSION)
        return False
    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]
    kombu_redis.Channel.__init__ = _init  # type: ignore[method-assign]
    return True


applied = apply()
