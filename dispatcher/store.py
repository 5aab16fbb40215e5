"""The boundary between the core and redis-py: every redis-py error becomes a ``StoreError``.

The core's public methods (``Registry``, ``Jobs``, ``Fleet``, the views, the outbox) are
what the web process calls, and they raise ``StoreError``, never a redis-py exception:
``StoreUnavailable`` when Redis cannot be reached, does not answer in time or refuses for
the moment (read-only during a failover, out of memory, busy with a script), ``StoreError``
when it refuses a command for good (WRONGTYPE, a script's own error); the redis-py error is
the ``__cause__``. Each call crosses one translation:

- script calls, in ``Scripts._call`` (``store_errors``), batched or not;
- every other command, in the client itself: ``Registry`` and ``Jobs`` keep a
  ``StoreClient`` (``store_client``), a client of the same connection pool whose commands
  and pipelines raise ``StoreError``; the views built on their ``client`` inherit it;
- a plain command sent through a ``ScriptBatcher`` (``store_errors`` where it is sent).

Code of the core that must tell redis-py's errors apart (a stream's consumer group gone)
looks at the ``__cause__``. Publish/subscribe is outside: the wake listener has a client
of its own and handles its errors itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import redis
import redis.exceptions as redis_errors
from redis.client import Pipeline
from redis.exceptions import NoScriptError, WatchError

from dispatcher.errors import StoreError, StoreUnavailable

#: redis-py errors that mean Redis was not reached or did not answer (BusyLoadingError and
#: AuthenticationError are ConnectionErrors), or refused for the moment: a replica that is
#: read-only until a failover promotes it, memory full, a cluster reconfiguring.
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, redis_errors.ReadOnlyError,
                redis_errors.OutOfMemoryError, redis_errors.TryAgainError, redis_errors.ClusterDownError)
#: Refusals of the moment that redis-py leaves as plain ResponseErrors, by their error code
#: (a script running past its time limit; a replica that lost its master).
_UNAVAILABLE_CODES = ("BUSY ", "MASTERDOWN ")


def unavailable(exc: redis.RedisError) -> bool:
    """Whether the same call may work later, with nothing changed on our side."""
    return isinstance(exc, _UNAVAILABLE) or (type(exc) is redis.ResponseError
                                             and str(exc).startswith(_UNAVAILABLE_CODES))


def store_error(exc: redis.RedisError) -> StoreError:
    """The StoreError a redis-py error becomes, with its message (raise it ``from exc``)."""
    kind = StoreUnavailable if unavailable(exc) else StoreError
    # redis-py takes the error code (OOM, READONLY...) off the message of the errors it has a
    # class for; an operator reading the answer wants it back.
    code = getattr(exc, "status_code", None)
    return kind(" ".join(filter(None, (code, str(exc)))) or type(exc).__name__)


@contextmanager
def store_errors() -> Iterator[None]:
    """Run the block with redis-py's errors raised as StoreErrors."""
    try:
        yield
    except redis.RedisError as exc:
        raise store_error(exc) from exc


def redis_refused(exc: BaseException, *codes: str) -> bool:
    """Whether ``exc`` (a StoreError, or redis-py's own error) is Redis refusing a command;
    given ``codes``, with an error reply naming one of them (e.g. ``NOGROUP``)."""
    cause = exc.__cause__ if isinstance(exc, StoreError) else exc
    return isinstance(cause, redis.ResponseError) and (not codes or any(code in str(cause) for code in codes))


class StoreClient(redis.Redis):
    """A client on the pool of another whose commands and pipelines raise StoreErrors.

    Two redis-py errors pass as they are, for redis-py's own handling: ``NoScriptError``
    (a ``Script`` loads itself again and retries) and ``WatchError`` (``transaction``
    retries). Scripts are called through ``Scripts`` on the client it was made from
    (``unwrapped``): ``Scripts._call`` translates their errors.
    """

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(connection_pool=client.connection_pool)
        #: The client this one was made from, which raises redis-py's errors.
        self.unwrapped = client

    def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return super().execute_command(*args, **options)
        except (NoScriptError, WatchError):
            raise
        except redis.RedisError as exc:
            raise store_error(exc) from exc

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> StorePipeline:
        return StorePipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class StorePipeline(Pipeline):
    """A pipeline whose execution raises StoreErrors (with ``raise_on_error=False`` the
    replies that are errors stay redis-py's, as values)."""

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            return super().execute(raise_on_error)
        except WatchError:
            raise
        except redis.RedisError as exc:
            raise store_error(exc) from exc

    def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return super().immediate_execute_command(*args, **options)
        except WatchError:
            raise
        except redis.RedisError as exc:
            raise store_error(exc) from exc


def store_client(client: redis.Redis) -> StoreClient:
    """``client`` as a StoreClient (itself when it is one)."""
    return client if isinstance(client, StoreClient) else StoreClient(client)


def unwrapped(client: redis.Redis) -> redis.Redis:
    """The client that raises redis-py's errors behind ``client`` (itself when it is one)."""
    return client.unwrapped if isinstance(client, StoreClient) else client


# --- replies as text ---------------------------------------------------------------------
# Every client of the core decodes replies (``decode_responses``, dispatcher/connection.py):
# a text a command returns is a str. redis-py's annotations cover clients that do not as well
# (``bytes | str``); these give a reply the type it has here, and refuse one that is not (a
# client made without decode_responses) rather than let b"..." compare unequal to every str.


def _checked(reply: object) -> str:
    if isinstance(reply, str):
        return reply
    raise TypeError(f"a reply that is not text ({reply!r:.80}): the core's clients decode replies")


def optional_text(reply: bytes | str | None) -> str | None:
    """A text reply that may be nil (HGET)."""
    return None if reply is None else _checked(reply)


def texts(reply: Iterable[object]) -> list[str]:
    """A list of texts (ZRANGE's members without scores, ZRANGEBYSCORE, HKEYS, LRANGE)."""
    return [_checked(item) for item in reply]


def optional_texts(reply: Iterable[bytes | str | None]) -> list[str | None]:
    """A list of texts that may be nil (HMGET)."""
    return [None if item is None else _checked(item) for item in reply]


def text_hash(reply: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """A hash (HGETALL)."""
    return {_checked(name): _checked(value) for name, value in reply.items()}


def scored(reply: Iterable[object]) -> list[tuple[str, float]]:
    """The members of ZRANGE ... WITHSCORES, each with its score."""
    pairs = []
    for pair in reply:
        match pair:
            case [member, float(score)]:  # (a tuple, or a list in RESP3's shape)
                pairs.append((_checked(member), score))
            case _:
                raise TypeError(f"not a member with its score: {pair!r:.80}")
    return pairs
