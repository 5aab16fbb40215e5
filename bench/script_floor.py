"""What a Lua script call costs Redis before it does any work: the floor under a job's Redis time.

    python bench/script_floor.py [--calls 20000]

On a private redis-server, calls each variant below ``--calls`` times and reads the server's
own time per call from ``INFO commandstats`` (EVALSHA's usec includes what the script runs):

- an empty script, with no keys, and with the node and job key bundles and a JSON parameter;
- the preludes the loader puts before a script (``--#include job``, ``--#include node job``):
  the helpers every call defines again;
- the smallest piece of real work a job's scripts do: a Celery state (``cjson.encode`` + ``SET
  ... EX``) and a frame queued with its wake-up (``RPUSH`` + ``PUBLISH``);
- a plain ``GET``, the kind of command a Celery no-op task is made of.

Why it exists: issue 8 asks for a job's Redis time to be at most 4x a Celery no-op task's.
A job is a Celery task (its submission costs what the no-op costs) plus four script calls
(submit, deliver, ack, complete); these floors say how much of the 3x left over four calls
that do real work can take. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import redis

from common import ROOT, LocalRedis

sys.path.insert(0, str(ROOT))
from dispatcher.keys import JOB_BUNDLE, NODE_BUNDLE
from dispatcher.scripts import _expand, _lua_folder


def variants() -> dict[str, tuple[str, int]]:
    """Name -> (Lua source, number of keys)."""
    folder = _lua_folder()

    def read(name: str) -> str:
        return (folder / name).read_text()
    both = len(NODE_BUNDLE) + len(JOB_BUNDLE)
    celery_state = ("redis.call('SET', KEYS[1], cjson.encode({status='STARTED', result={node_id='n', attempt=1},"
                    " task_id='abc', date_done=cjson.null}), 'EX', 86400) redis.call('PUBLISH', KEYS[1], 'x')")
    return {
        "empty script, no key": ("return 0", 0),
        f"empty script, {both} keys, JSON parameter": ("return 0", both),
        "  + decode the JSON parameter": ("local P = cjson.decode(ARGV[1]) return 0", both),
        "  + preludes of a job script": (_expand("--#include job\nreturn 0", read), len(JOB_BUNDLE)),
        "  + preludes of a node and job script": (_expand("--#include node job\nreturn 0", read), both),
        "a Celery state: encode, SET EX, PUBLISH": (celery_state + " return 0", both),
        "a frame: RPUSH + PUBLISH": ("redis.call('RPUSH', KEYS[2], ARGV[1]) redis.call('PUBLISH', 'wake', 'n')"
                                     " redis.call('LTRIM', KEYS[2], 1, 0) return 0", both),
    }


def usec_per_call(client: redis.Redis, command: str) -> float:
    return float(client.info("commandstats")[f"cmdstat_{command}"]["usec_per_call"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    parameter = json.dumps({"job_id": "j", "attempt": 1, "node_id": "n", "now_ms": 1, "wake_channel": "wake"})
    server = LocalRedis(Path(tempfile.mkdtemp(prefix="floor-")), append_only=False).start()
    figures: dict[str, float] = {}
    try:
        client = redis.Redis.from_url(server.url)
        for name, (source, n_keys) in variants().items():
            sha = client.script_load(source)
            keys = [f"k{i}" for i in range(n_keys)]
            pipe = client.pipeline(transaction=False)
            for _ in range(args.calls):
                pipe.evalsha(sha, n_keys, *keys, parameter)
            client.config_resetstat()
            pipe.execute()  # one pipeline: the figure is the server's time, not the client's
            figures[name] = usec_per_call(client, "evalsha")
        client.config_resetstat()
        pipe = client.pipeline(transaction=False)
        for _ in range(args.calls):
            pipe.get("absent")
        pipe.execute()
        figures["a plain GET"] = usec_per_call(client, "get")
    finally:
        server.stop()
    print(f"{'Redis time per call (INFO commandstats)':48s} {'usec':>7s}")
    for name, usec in figures.items():
        print(f"{name:48s} {usec:7.2f}")
    print(json.dumps({"calls": args.calls, "usec_per_call": figures}))


if __name__ == "__main__":
    main()
