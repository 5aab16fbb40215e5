"""Script calls grouped into pipelines: same replies, same errors, per caller."""

from __future__ import annotations

import threading

import pytest
import redis

from dispatcher.batching import ScriptBatcher


def test_concurrent_calls_each_get_their_own_reply(r: redis.Redis) -> None:
    echo = r.register_script("return {KEYS[1], ARGV[1]}")
    batcher = ScriptBatcher(r, max_batch=7, flushers=2)
    replies: dict[int, object] = {}

    def one(i: int) -> None:
        replies[i] = batcher.call(echo, [f"k{i}"], [i])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert replies == {i: [f"k{i}", str(i)] for i in range(50)}


def test_errors_reach_only_their_caller_and_plain_commands_work(r: redis.Redis) -> None:
    failing = r.register_script("return redis.error_reply('no: ' .. ARGV[1])")
    batcher = ScriptBatcher(r)
    with pytest.raises(redis.ResponseError, match="no: 1"):
        batcher.call(failing, [], [1])
    r.hset("h", mapping={"a": "1"})
    assert batcher.command("HMGET", "h", "a", "b") == ["1", None]


def test_a_script_flushed_from_redis_is_loaded_again(r: redis.Redis) -> None:
    script = r.register_script("return ARGV[1] + 1")
    batcher = ScriptBatcher(r)
    assert batcher.call(script, [], [1]) == 2
    r.script_flush()
    assert batcher.call(script, [], [2]) == 3
