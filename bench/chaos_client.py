"""The client side of bench/chaos.py: submits the jobs, watches their states, waits for them.

It behaves as docs/operations.md asks of a client: a submission Redis refused is
sent again, and so is a job with no answer for too long, both with the same task
id (submission is idempotent per task id).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from pathlib import Path

import redis
from celery import Celery

from chaos_system import KEYS, Supervisor, log
from common import chunks
from dispatcher.completions import unapplied

FINAL_JOB_STATES = {"succeeded", "failed", "cancelled"}
FINAL_CELERY_STATES = {"SUCCESS", "FAILURE", "REVOKED"}
#: How long the client keeps retrying one submission before giving it up.
SUBMIT_GIVE_UP_S = 120.0
#: A job with no answer this long after it was sent is sent again with the same task id, as
#: docs/operations.md asks of clients: kombu can lose a message in flight to a worker that
#: dies or a Redis that restarts. Longer than the broker's visibility timeout (60 s) plus its
#: sweep (10 s), so that a message merely held by a killed worker is not sent again for that.
RESEND_AFTER_S = 90.0


def submit(app: Celery, job_id: str, n: int, job_timeout_s: float) -> None:
    app.send_task("dispatcher.submit_job", task_id=job_id, ignore_result=True,
                  kwargs={"job_type": "echo", "payload": {"n": n}, "max_attempts": 5,
                          "timeout_seconds": job_timeout_s})


class Submitter(threading.Thread):
    """Submits job i at t0 + i / rate. Redis may be down for a moment: the same task id is
    sent again until it goes through (submission is idempotent per task id)."""

    def __init__(self, redis_url: str, job_ids: list[str], rate_per_s: float, job_timeout_s: float) -> None:
        super().__init__(name="submitter", daemon=True)
        self.redis_url = redis_url
        self.job_ids = job_ids
        self.rate_per_s = rate_per_s
        self.job_timeout_s = job_timeout_s
        self.sent = 0
        self.retries = 0
        self.gave_up: list[str] = []
        #: When each job was sent (monotonic s), and the jobs sent again for want of an answer.
        self.sent_s: dict[str, float] = {}
        self.resent: list[str] = []
        self.started_s = 0.0

    def run(self) -> None:
        # ignore_result: this client never waits on a result (a Celery client waiting across a
        # Redis restart can miss a result published while its subscription reconnects); a fresh
        # client reads every result after the chaos.
        app = Celery(broker=self.redis_url, backend=self.redis_url)
        self.started_s = time.monotonic()
        for n, job_id in enumerate(self.job_ids):
            time.sleep(max(0.0, self.started_s + n / self.rate_per_s - time.monotonic()))
            self._submit(app, job_id, n)

    def _submit(self, app: Celery, job_id: str, n: int) -> None:
        give_up_s = time.monotonic() + SUBMIT_GIVE_UP_S
        while True:
            try:
                submit(app, job_id, n, self.job_timeout_s)
                self.sent += 1
                self.sent_s[job_id] = time.monotonic()
                return
            except Exception:  # noqa: BLE001 - Redis down or reconnecting; the same id again is safe
                self.retries += 1
                if time.monotonic() > give_up_s:
                    self.gave_up.append(job_id)
                    return
                time.sleep(0.2)


class StateWatch(threading.Thread):
    """Every 2 s, reads each submitted job's state in our records and in Celery's backend and
    remembers the first final one: a final state that changes later is a job completed twice."""

    def __init__(self, redis_url: str, job_ids: list[str], submitter: Submitter, probe_log: Path) -> None:
        super().__init__(name="watch", daemon=True)
        self.probe_log = probe_log
        #: The highest value of each queue sample (see _sample_queues).
        self.peaks: dict[str, float] = {}
        self.r = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=5)
        self.job_ids = job_ids
        self.submitter = submitter
        self.first_final: dict[str, str] = {}
        self.first_celery: dict[str, str] = {}
        self.changed: dict[str, list[str]] = {}
        self.last_states: Counter[str] = Counter()
        self.all_final_s: float | None = None
        #: When the number of jobs in a final state last grew (the end of the work, when some never end).
        self.final_count = 0
        self.last_final_s: float | None = None
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)

    def run(self) -> None:
        while not self._stopping.wait(2.0):
            with contextlib.suppress(redis.RedisError):  # Redis is down for a moment; look again next round
                self.look()

    def look(self) -> None:
        ids = self.job_ids[:self.submitter.sent + len(self.submitter.gave_up)]
        states: Counter[str] = Counter()
        for chunk in chunks(ids, 1000):
            pipe = self.r.pipeline(transaction=False)
            for job_id in chunk:
                pipe.hget(KEYS.job(job_id), "state")
                pipe.get(f"celery-task-meta-{job_id}")
            replies = pipe.execute()
            for job_id, state, meta in zip(chunk, replies[::2], replies[1::2], strict=True):
                states[state or "no record"] += 1
                self._remember(job_id, "record", state, self.first_final, FINAL_JOB_STATES)
                status = json.loads(meta)["status"] if meta else None
                self._remember(job_id, "celery", status, self.first_celery, FINAL_CELERY_STATES)
        self.last_states = states
        self._sample_queues()
        final = sum(states.get(state, 0) for state in FINAL_JOB_STATES)
        if final > self.final_count:
            self.final_count, self.last_final_s = final, time.monotonic()
        if self.all_final_s is None and len(ids) == len(self.job_ids) and final == len(ids):
            self.all_final_s = time.monotonic()

    def _sample_queues(self) -> None:
        """How far behind the workers are: Celery's queue, results not yet applied,
        deadlines overdue, and the age of the last periodic scan (written to probe.log)."""
        now_ms = int(time.time() * 1000)
        pipe = self.r.pipeline(transaction=False)
        pipe.llen("celery")
        pipe.hlen("unacked")
        pipe.zcard(KEYS.waiting())
        pipe.zcount(KEYS.deadlines(), "-inf", now_ms - 1000)
        pipe.hget(KEYS.scan_state(), "at_ms")
        queue, unacked, waiting, overdue, scan_at_ms = pipe.execute()
        sample = {"celery_queue": queue, "unacked": unacked, "waiting": waiting,
                  "results_unapplied": unapplied(self.r, KEYS.results()),
                  "deadlines_overdue": overdue, "scan_age_s": round((now_ms - int(scan_at_ms or now_ms)) / 1000, 1)}
        for name, value in sample.items():
            self.peaks[name] = max(self.peaks.get(name, 0), value)
        with self.probe_log.open("a") as out:
            out.write(json.dumps({"at": time.strftime("%H:%M:%S"), **sample}) + "\n")

    def _remember(self, job_id: str, where: str, state: str | None, first: dict[str, str], final: set[str]) -> None:
        if state not in final:
            if job_id in first and state is not None:
                self.changed.setdefault(job_id, []).append(f"{where}: {first[job_id]} -> {state}")
            return
        if job_id not in first:
            first[job_id] = state
        elif first[job_id] != state:
            self.changed.setdefault(job_id, []).append(f"{where}: {first[job_id]} -> {state}")


def resend_unanswered(app: Celery, watch: StateWatch, submitter: Submitter) -> None:
    """What a careful client does: a job with no answer after RESEND_AFTER_S is sent again,
    with the same task id (safe: submission is idempotent per task id)."""
    now_s = time.monotonic()
    for n, job_id in enumerate(submitter.job_ids):
        sent_s = submitter.sent_s.get(job_id)
        if (sent_s is None or job_id in watch.first_celery or job_id in submitter.resent
                or now_s - sent_s < RESEND_AFTER_S):
            continue
        try:
            submit(app, job_id, n, submitter.job_timeout_s)
        except Exception:  # noqa: BLE001 - Redis down for a moment: next round
            return
        submitter.resent.append(job_id)
        log(f"no answer for {job_id} after {RESEND_AFTER_S:.0f} s: sent again with the same task id")


def settle(watch: StateWatch, supervisor: Supervisor, killer_done: threading.Event, submitter: Submitter,
           timeout_s: float) -> None:
    """Wait (bounded) for the chaos to be over and every job to be final, in both stores."""
    deadline = time.monotonic() + timeout_s
    next_report_s = 0.0
    client = Celery(broker=submitter.redis_url, backend=submitter.redis_url)
    while time.monotonic() < deadline:
        resend_unanswered(client, watch, submitter)
        over = killer_done.is_set() and not submitter.is_alive() and supervisor.all_up()
        done = over and watch.all_final_s is not None and len(watch.first_celery) == len(watch.job_ids)
        if done:
            return
        if time.monotonic() >= next_report_s:
            log(f"waiting for the jobs to end: {dict(watch.last_states)}; results in the backend "
                f"{len(watch.first_celery)}/{len(watch.job_ids)}")
            next_report_s = time.monotonic() + 10
        time.sleep(1)
    log(f"gave up waiting after {timeout_s:.0f} s: {dict(watch.last_states)}")
