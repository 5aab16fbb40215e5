"""Completion: the nodes' results, applied in the Celery workers.

The web process that receives a node's ``job_result`` appends it to the results
stream (``Jobs.report_result``: one XADD). Every worker reads the stream in one
consumer group, from a thread of its main process (``CompletionStep``, a
bootstep), applies each result with the completion script (fenced by attempt:
it frees the slot, ends the job or sends it back to wait, and writes the job's
Celery state), then acknowledges the batch. Results come in batches under load,
one read and one acknowledgement for many.

A worker that dies holding results leaves them pending in the group. The
periodic scan claims those idle for a while, and reads what no worker has yet,
before it looks at any deadline: a result that reached the dispatcher in time
is applied, not thrown away as a timeout. Applying a result twice changes
nothing the second time: the script finds the attempt over and says so.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import redis
from celery import Celery, bootsteps

from dispatcher.errors import StoreError, StoreUnavailable
from dispatcher.jobs import AttemptOutcome, Jobs
from dispatcher.keys import RESULTS_GROUP
from dispatcher.logs import log_event
from dispatcher.store import redis_refused

log = logging.getLogger("dispatcher.completions")

#: Results read at once.
BATCH = 200
#: How long a read waits for a result before looking at the stop flag again.
BLOCK_MS = 1000
#: A result delivered to a worker this long ago and not acknowledged is the scan's to apply.
CLAIM_IDLE_MS = 2000
#: A consumer that holds nothing and has not read for this long is a worker gone: forgotten.
GONE_CONSUMER_IDLE_MS = 600_000

Entry = tuple[str, dict[str, str]]


def unapplied(client: redis.Redis, stream: str) -> int:
    """Results handed on that no worker has applied yet: held by a worker (pending) or read
    by none (the group's lag). What an operator watches for a stuck completion path."""
    groups = client.xinfo_groups(stream) if client.exists(stream) else []
    group = next((g for g in groups if g["name"] == RESULTS_GROUP), None)
    if group is None:
        return int(client.xlen(stream))
    return int(group["pending"]) + int(group.get("lag") or 0)


class Completions:
    """Reads the results stream as one consumer of the group, and applies what it reads."""

    def __init__(self, jobs: Jobs, consumer: str) -> None:
        self.jobs = jobs
        self.client = jobs.client
        self.stream = jobs.keys.results()
        self.consumer = consumer
        self._group_made = False

    def ensure_group(self) -> None:
        """The group reads from the stream's start: results sent before any worker ran count too."""
        try:
            self.client.xgroup_create(self.stream, RESULTS_GROUP, id="0", mkstream=True)
        except StoreError as exc:
            if not redis_refused(exc, "BUSYGROUP"):
                raise
        self._group_made = True

    def read(self, block_ms: int | None) -> list[Entry]:
        if not self._group_made:
            self.ensure_group()
        try:
            reply = self.client.xreadgroup(RESULTS_GROUP, self.consumer, {self.stream: ">"}, count=BATCH,
                                           block=block_ms)
        except StoreError as exc:
            # NOGROUP: Redis lost its data (a restart without persistence); UNBLOCKED: the stream
            # was deleted while this read waited on it. Either way: make the group again.
            if not redis_refused(exc, "NOGROUP", "UNBLOCKED"):
                raise
            self._group_made = False
            return []
        if isinstance(reply, dict):
            raise TypeError("XREADGROUP answered in RESP3's shape: the core's clients read RESP2's (legacy_responses)")
        # [[stream, [(id, fields), ...]]], or None when nothing came in block_ms
        return [entry for _, entries in reply or [] for entry in entries]

    def apply(self, entries: list[Entry]) -> int:
        """Apply each result, then acknowledge them all; a pass over the waiting jobs when a
        freed slot could serve one. Returns how many ended their job or sent it back."""
        applied, kick = 0, False
        for entry_id, fields in entries:
            try:
                outcome, freed = self.jobs.complete(fields)
            except StoreError as exc:
                if not redis_refused(exc):
                    raise
                # A script error is a bug, and would recur: drop the result (the job times out
                # and is retried) rather than retry it forever.
                log_event(log, "result_dropped", logging.ERROR, entry=entry_id, job_id=fields.get("job_id"),
                          error=str(exc)[:500])
                continue
            applied += outcome is not AttemptOutcome.STALE
            kick = kick or freed
        if entries:
            self.client.xack(self.stream, RESULTS_GROUP, *(entry_id for entry_id, _ in entries))
        if kick:
            self.jobs.dispatch_waiting()
        return applied

    def recover(self) -> int:
        """For the scan: apply what a dead worker held, and what no worker has read yet."""
        if not self._group_made:
            self.ensure_group()
        claimed: list[Entry] = []
        start = "0-0"
        while len(claimed) < 10 * BATCH:
            start, entries, *_ = self.client.xautoclaim(self.stream, RESULTS_GROUP, self.consumer, CLAIM_IDLE_MS,
                                                        start_id=start, count=BATCH)
            claimed += [entry for entry in entries if entry[1]]  # an entry trimmed meanwhile has no fields
            if start in ("0-0", b"0-0"):
                break
        return self.apply(claimed) + self.apply(self.read(None))

    def trim(self) -> None:
        """Drop the results every worker is done with: those before the oldest still pending,
        or up to the last one handed out when none is."""
        if not self.client.exists(self.stream):
            return
        groups = {g["name"]: g for g in self.client.xinfo_groups(self.stream)}
        group = groups.get(RESULTS_GROUP)
        if group is None:
            return
        pending = self.client.xpending(self.stream, RESULTS_GROUP)
        oldest = pending["min"] if pending["pending"] else group["last-delivered-id"]
        self.client.xtrim(self.stream, minid=oldest, approximate=False)
        if group["consumers"] > 0:
            for consumer in self.client.xinfo_consumers(self.stream, RESULTS_GROUP):
                if consumer["pending"] == 0 and consumer["idle"] > GONE_CONSUMER_IDLE_MS:
                    self.client.xgroup_delconsumer(self.stream, RESULTS_GROUP, consumer["name"])

    def run(self, stop: threading.Event) -> None:
        """The worker's loop: read, apply, acknowledge, until ``stop``; through Redis restarts."""
        pause_s = 0.1
        while not stop.is_set():
            try:
                self.apply(self.read(BLOCK_MS))
                pause_s = 0.1
            except StoreUnavailable as exc:
                log_event(log, "results_unreachable", logging.WARNING, error=str(exc)[:200], retry_in_s=pause_s)
                stop.wait(pause_s)
                pause_s = min(pause_s * 2, 5.0)
            except Exception as exc:  # the loop must outlive any one bad batch
                log.exception("completion loop error: %s", exc)
                stop.wait(1.0)


class CompletionStep(bootsteps.StartStopStep):
    """Starts the completion loop in a worker's main process, once its pool has forked."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        from dispatcher.core import process_core
        from dispatcher.settings import get_settings

        app: Celery = worker.app
        # The process's core: the revoke handler uses the same jobs (dispatcher/revoke.py).
        jobs = process_core(get_settings(), app).jobs
        consumer = f"{worker.hostname or socket.gethostname()}:{os.getpid()}"
        completions = Completions(jobs, consumer)
        self._thread = threading.Thread(target=completions.run, args=(self._stop,), name="completions", daemon=True)
        self._thread.start()
        log_event(log, "completions_started", consumer=consumer)

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(BLOCK_MS / 1000 + 2)

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)

    def terminate(self, worker: Any) -> None:
        # A cold shutdown calls terminate, not stop; the base class's would stop nothing here.
        self.stop(worker)

