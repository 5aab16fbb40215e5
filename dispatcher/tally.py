"""A process's counts, added to Redis in sums: the fleet's counters live with its truth.

Each process (a web worker, a Celery worker or one of its pool processes) counts
in memory what happens in it (decisions, exclusions, jobs finished, heartbeats,
transitions, latencies) and a thread of its own adds the sums to Redis once a
second, in one pipeline: a job or a heartbeat adds no Redis call of its own.
Any web process reads the sums when scraped (dispatcher/metrics.py), whichever
host each process runs on.

Where the sums go (all under the key prefix):

- ``Keys.stats()``: counters, ``<name>:<label value>:...`` -> count (also what
  ``GET /api/stats`` reads: ``decisions:<outcome>``, ``excluded:<reason>``);
- ``Keys.stats_histograms()``: ``<name>|<label values>|<bucket index>`` -> count,
  and ``...|sum`` -> seconds;
- ``Keys.stats_examples()``: exclusion reason -> the latest example node ids;
- each node's own record: its jobs finished by state (``finished_<state>``), only
  when per-node series are asked for (``metrics_node_series``); a node deleted
  meanwhile is not brought back.

A process whose flush fails keeps its sums for the next one; counts of a process
killed within the second are lost (a counter's rate, not the truth, suffers).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

import redis

from dispatcher.errors import StoreError

if TYPE_CHECKING:  # (scripts.py imports the metrics, which import this module)
    from dispatcher.scripts import Scripts

#: Seconds between two flushes of a process's sums.
FLUSH_EVERY_S = 1.0
#: Nodes whose job counts one script call adds at most (a flush after a busy second).
_NODES_PER_CALL = 500


class Tally:
    """Sums of one process waiting to be added to Redis (see the module's docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._buckets: Counter[str] = Counter()
        self._seconds: defaultdict[str, float] = defaultdict(float)
        self._examples: dict[str, list[str]] = {}
        self._nodes: dict[str, Counter[str]] = {}
        #: The Redis client, and the scripts (with their keys), the sums go to.
        self._client: redis.Redis | None = None
        self._scripts: Scripts | None = None
        self._flusher_pid: int | None = None

    def bind(self, client: redis.Redis, scripts: Scripts) -> None:
        """Send the sums to this Redis, under the keys of these scripts
        (``dispatcher.scripts.Scripts``). A process binds its one client many times over;
        sums pending for another Redis or key prefix (only tests switch) are dropped, never
        written to the wrong one."""
        with self._lock:
            if (self._client is not None and self._scripts is not None
                    and _where(self._client, self._scripts) == _where(client, scripts)):
                return
            self._clear()
            self._client, self._scripts = client, scripts

    def count(self, field: str, n: int = 1) -> None:
        with self._lock:
            self._counts[field] += n
            self._start_flusher()

    def observe(self, field: str, bucket: int, seconds: float) -> None:
        """One observation of a histogram: its bucket's index, and its value for the sum."""
        with self._lock:
            self._buckets[f"{field}|{bucket}"] += 1
            self._seconds[f"{field}|sum"] += seconds
            self._start_flusher()

    def examples(self, reason: str, node_ids: list[str]) -> None:
        with self._lock:
            self._examples[reason] = node_ids
            self._start_flusher()

    def count_node(self, node_id: str, field: str) -> None:
        with self._lock:
            self._nodes.setdefault(node_id, Counter())[field] += 1
            self._start_flusher()

    def _start_flusher(self) -> None:
        # Started by the first count in each process (a forked pool process has no thread).
        if self._flusher_pid != os.getpid():
            self._flusher_pid = os.getpid()
            threading.Thread(target=self._flush_every_second, name="tally-flush", daemon=True).start()

    def _flush_every_second(self) -> None:
        while True:
            time.sleep(FLUSH_EVERY_S)
            self.flush()

    def _clear(self) -> None:
        self._counts, self._buckets, self._seconds = Counter(), Counter(), defaultdict(float)
        self._examples, self._nodes = {}, {}

    def flush(self) -> None:
        """Add the sums counted since the last flush to Redis (kept for the next one on failure)."""
        with self._lock:
            client, scripts = self._client, self._scripts
            if client is None or scripts is None or not (self._counts or self._buckets or self._examples
                                                         or self._nodes):
                return
            counts, buckets, seconds, examples, nodes = (self._counts, self._buckets, self._seconds,
                                                         self._examples, self._nodes)
            self._clear()
        keys = scripts.keys
        pipe = client.pipeline(transaction=False)
        for field, n in counts.items():
            pipe.hincrby(keys.stats(), field, n)
        for field, n in buckets.items():
            pipe.hincrby(keys.stats_histograms(), field, n)
        for field, value in seconds.items():
            pipe.hincrbyfloat(keys.stats_histograms(), field, value)
        if examples:
            pipe.hset(keys.stats_examples(), mapping={r: json.dumps(ids) for r, ids in examples.items()})
        try:
            pipe.execute()
        except (redis.RedisError, StoreError):
            self._restore(scripts, counts, buckets, seconds, examples, nodes)
            return
        node_ids = list(nodes)
        for start in range(0, len(node_ids), _NODES_PER_CALL):
            chunk = node_ids[start:start + _NODES_PER_CALL]
            try:
                scripts.count_node_jobs({node_id: dict(nodes[node_id]) for node_id in chunk})
            except (redis.RedisError, StoreError):
                self._restore(scripts, Counter(), Counter(), {}, {}, {n: nodes[n] for n in node_ids[start:]})
                return

    def _restore(self, scripts: Scripts, counts: Counter[str], buckets: Counter[str], seconds: dict[str, float],
                 examples: dict[str, list[str]], nodes: dict[str, Counter[str]]) -> None:
        """Put back sums a flush could not write (unless the process switched Redis meanwhile)."""
        with self._lock:
            if self._scripts is not scripts:
                return
            self._counts.update(counts)
            self._buckets.update(buckets)
            for field, value in seconds.items():  # (added to the sums counted since: update would replace them)
                self._seconds[field] += value
            self._examples = {**examples, **self._examples}
            for node_id, fields in nodes.items():
                self._nodes.setdefault(node_id, Counter()).update(fields)


def _where(client: redis.Redis, scripts: Scripts) -> tuple[Any, ...]:
    """The database and key prefix sums go to."""
    kwargs = client.connection_pool.connection_kwargs
    return (*(kwargs.get(k) for k in ("host", "port", "path", "db")), scripts.keys.prefix)


#: The process's tally.
TALLY = Tally()


def _forget_in_child() -> None:
    # A process forked later (a Celery pool process replaced) would add its parent's pending
    # sums a second time; its parent writes them.
    TALLY._lock = threading.Lock()
    TALLY._clear()


os.register_at_fork(after_in_child=_forget_in_child)
