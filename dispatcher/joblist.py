"""Jobs listed by state and node, newest submitted first, a page at a time.

Read from indexes, never from a walk over every job record:

- ``waiting``: the waiting queue, scored by priority and then submission time:
  one range per priority, merged;
- ``running`` (assigned to a node, acknowledged or not): a node's assigned jobs;
  without a node, every job in flight (those with a deadline that do not wait),
  so such a page costs in proportion to the jobs in flight;
- ``succeeded``, ``failed``, ``cancelled``: one sorted set per final state, which
  the script that ends a job writes (scored by submission time) and the scan trims
  to the records' retention.

With a node, finished jobs are read newest first and kept when their record names
that node (its last attempt's), at most ``FILTER_FACTOR`` x ``limit`` of them per
page: a page may then hold fewer than ``limit`` jobs while ``next_cursor`` goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis

from dispatcher.jobspec import MAX_PRIORITY, QUEUE_BAND
from dispatcher.keys import Keys
from dispatcher.messages import valid_job_id
from dispatcher.records import JobRecord
from dispatcher.store import scored, texts
from dispatcher.vocabulary import FINAL_STATES, JobState

#: The states a listing takes, in a job's lifecycle order.
LIST_STATES = (JobState.WAITING, JobState.RUNNING, *FINAL_STATES)
#: Finished jobs looked at per listed one when listing one node's.
FILTER_FACTOR = 10
#: Ids read per call from a sorted set or a pipeline.
_CHUNK = 500
#: Fields of a job shown in a listing (the full record is GET /api/jobs/<id>).
_FIELDS = ("state", "job_type", "priority", "required_models", "node_id", "attempt", "max_attempts",
           "submitted_ms", "assigned_ms", "finished_ms", "progress", "outcome")


def listed_view(job_id: str, job: JobRecord) -> dict[str, Any]:
    """A job as a listing shows it: its ``_FIELDS``, in that order, as the codec read them."""
    return {"job_id": job_id,
            **{name: job.state_text if name == "state" else getattr(job, name) for name in _FIELDS}}


@dataclass(frozen=True, order=True)
class Position:
    """Where a job stands in a listing: newest submitted first, then by id (descending)."""

    submitted_ms: int
    job_id: str

    def cursor(self) -> str:
        return f"{self.submitted_ms}:{self.job_id}"

    @classmethod
    def from_cursor(cls, text: str) -> Position:
        """Raises ValueError for a text that no listing gave as ``next_cursor``."""
        ms, sep, job_id = text.partition(":")
        if not (sep and ms.isdigit() and len(ms) <= 15 and valid_job_id(job_id)):
            raise ValueError(text)
        return cls(int(ms), job_id)


#: What one source gives: its jobs after the cursor, newest first (at most the limit), and
#: where it stopped looking (None: it has nothing older than what it gave).
Found = tuple[list[Position], Position | None]


class JobList:
    """Pages of jobs for the HTTP API, the CLI and the page; never writes."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def page(self, state: str | None = None, node_id: str | None = None, limit: int = 50,
             cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """One page of jobs (``state`` one of LIST_STATES, or None for all) newest submitted
        first, and the cursor of the next page (None on the last). Raises ValueError for a
        cursor that is not a ``next_cursor``."""
        after = Position.from_cursor(cursor) if cursor else None
        sources = self._sources(state, node_id)
        found = [source(after, limit) for source in sources]
        # A source that stopped early has not looked past its stop: nothing older than the
        # newest stop may be listed yet, or a job of that source could be skipped.
        stops = [stop for _, stop in found if stop is not None]
        bound = max(stops) if stops else None
        merged = sorted({p for positions, _ in found for p in positions if bound is None or p >= bound},
                        reverse=True)
        shown = merged[:limit]
        if len(merged) > limit or (len(shown) == limit and bound is not None):
            next_cursor: str | None = shown[-1].cursor()
        elif bound is not None:
            next_cursor = bound.cursor()
        else:
            next_cursor = None
        return self._views(shown), next_cursor

    def _sources(self, state: str | None, node_id: str | None) -> list[Callable[[Position | None, int], Found]]:
        k = self.keys
        sources: list[Callable[[Position | None, int], Found]] = []
        if state in (None, JobState.WAITING) and node_id is None:
            for priority in range(MAX_PRIORITY + 1):
                band = (MAX_PRIORITY - priority) * QUEUE_BAND
                sources.append(partial(self._from_sorted_set, k.waiting(), band=band))
        if state in (None, JobState.RUNNING):
            sources.append(lambda after, limit: self._running(node_id, after, limit))
        for final in FINAL_STATES:
            if state in (None, final):
                sources.append(partial(self._from_sorted_set, k.finished(final), band=None, node_id=node_id))
        return sources

    def _from_sorted_set(self, key: str, after: Position | None, limit: int, band: int | None,
                         node_id: str | None = None) -> Found:
        """Jobs of a sorted set scored by submission time (plus ``band``: the part of the waiting
        queue of one priority), newest first, after ``after``; with ``node_id``, only those whose
        record names it, looking at FILTER_FACTOR x limit of them."""
        base = band or 0
        top: int | str = base + after.submitted_ms if after else ("+inf" if band is None else base + QUEUE_BAND - 1)
        low: int | str = "-inf" if band is None else base
        found: list[Position] = []
        looked, offset = 0, 0
        while True:
            batch = scored(self.client.zrange(key, top, low, byscore=True, desc=True, offset=offset, num=_CHUNK,
                                              withscores=True))
            offset += len(batch)
            positions = [Position(int(score) - base, job_id) for job_id, score in batch]
            # (ties at the cursor's time: those not after it come first and are skipped)
            kept = [p for p in positions if after is None or p < after]
            if node_id is not None and kept:
                pipe = self.client.pipeline(transaction=False)
                for p in kept:
                    pipe.hget(self.keys.job(p.job_id), "node_id")
                kept = [p for p, holder in zip(kept, pipe.execute(), strict=True) if holder == node_id]
            for p in kept:
                found.append(p)
                if len(found) == limit:
                    return found, p
            looked += len(batch)
            if len(batch) < _CHUNK:
                return found, None
            if node_id is not None and looked >= FILTER_FACTOR * limit and (after is None or positions[-1] < after):
                return found, positions[-1]

    def _running(self, node_id: str | None, after: Position | None, limit: int) -> Found:
        """Jobs on a node (its assigned jobs), or every job in flight."""
        if node_id is not None:
            ids = texts(self.client.hkeys(self.keys.assigned(node_id)))
        else:
            ids = []
            for start in range(0, self.client.zcard(self.keys.deadlines()), _CHUNK):
                chunk = texts(self.client.zrange(self.keys.deadlines(), start, start + _CHUNK - 1))
                if chunk:
                    waiting = self.client.zmscore(self.keys.waiting(), chunk)
                    ids += [job_id for job_id, score in zip(chunk, waiting, strict=True) if score is None]
        positions = []
        for start in range(0, len(ids), _CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids[start:start + _CHUNK]:
                pipe.hmget(self.keys.job(job_id), "state", "submitted_ms")
            for job_id, values in zip(ids[start:start + _CHUNK], pipe.execute(), strict=True):
                job = JobRecord.from_hash(dict(zip(("state", "submitted_ms"), values, strict=True)))
                if job.state in (JobState.ASSIGNED, JobState.RUNNING):
                    positions.append(Position(job.submitted_ms or 0, job_id))
        positions = sorted((p for p in positions if after is None or p < after), reverse=True)
        return (positions[:limit], positions[limit - 1]) if len(positions) > limit else (positions, None)

    def _views(self, positions: list[Position]) -> list[dict[str, Any]]:
        pipe = self.client.pipeline(transaction=False)
        for p in positions:
            pipe.hmget(self.keys.job(p.job_id), _FIELDS)
        views = []
        for p, values in zip(positions, pipe.execute(), strict=True):
            job = JobRecord.from_hash(dict(zip(_FIELDS, values, strict=True)))
            if job.state_text is None:
                continue  # its record expired before the scan trimmed its index entry
            views.append(listed_view(p.job_id, job))
        return views

    def trim(self, now_ms: int, retention_ms: int) -> int:
        """Drop the finished jobs submitted before the retention (the scan calls it; a job's
        record is kept the retention from its end). Returns how many entries went."""
        pipe = self.client.pipeline(transaction=False)
        for state in FINAL_STATES:
            pipe.zremrangebyscore(self.keys.finished(state), "-inf", now_ms - retention_ms)
        return sum(pipe.execute())
