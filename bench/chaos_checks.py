"""What bench/chaos.py reads once the chaos is over, what it checks, and how it reports.

The evidence: each job's answer to a fresh client's get(), the dispatcher's
records in Redis, what the node handler wrote down (bench/chaos_handler.py) and
what is left in the fleet's indexes and the broker. The checks: no job lost,
none completed twice, no (job, attempt) run twice, every output right, nothing
left behind.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis
from celery import Celery
from celery.exceptions import TimeoutError as GetTimeout

from chaos_client import FINAL_JOB_STATES, StateWatch, Submitter
from chaos_system import KEYS, Supervisor, System, wait_nodes_ready
from common import chunks
from dispatcher.completions import unapplied

Run = tuple[str, int]  # (node name, agent pid): who started one execution
Record = tuple[str | None, list[dict[str, Any]]]  # a job's state and attempts in the dispatcher's records

UNACKED = "submit_job in kombu's unacked hash (a worker took it and died)"
NOWHERE = "submit_job nowhere in the broker"
#: Figures that fail the run when they are not zero (the leftovers too).
FAILING = ("jobs_lost", "get_unanswered", "completed_twice", "ran_twice_same_attempt", "wrong_output",
           "assignment_records_left", "slots_not_free")


# --- reading -------------------------------------------------------------------------


def read_results(redis_url: str, job_ids: list[str], watch: StateWatch, get_timeout_s: float,
                 unfinished_budget_s: float = 30.0) -> tuple[dict[str, Any], int]:
    """What a client's get() says of each job, with a fresh client: ("SUCCESS", output),
    (exception name, message), or None when get() did not answer in time.

    A job our records do not call final is most likely unanswered: its get() waits 0.2 s, and
    once those waits add up to ``unfinished_budget_s`` the rest are not asked (they count as
    unanswered), so that a run where thousands of jobs never ended still reports. Returns the
    answers and how many were not asked."""
    app = Celery(broker=redis_url, backend=redis_url)
    answers: dict[str, Any] = {}
    not_asked = 0
    unfinished_waited_s = 0.0
    for job_id in job_ids:
        final = job_id in watch.first_final
        if not final and unfinished_waited_s >= unfinished_budget_s:
            answers[job_id] = None
            not_asked += 1
            continue
        timeout_s = get_timeout_s if final else 0.2
        result = app.AsyncResult(job_id)
        started_s = time.monotonic()
        try:
            answers[job_id] = ("SUCCESS", result.get(timeout=timeout_s))
        except GetTimeout:
            answers[job_id] = None
            app.backend.remove_pending_result(result)  # unsubscribe now, while Redis runs
        except Exception as exc:  # noqa: BLE001 - the job's failure, re-raised by get()
            answers[job_id] = (type(exc).__name__, str(exc))
        if not final:
            unfinished_waited_s += time.monotonic() - started_s
        del result
    # A pending AsyncResult unsubscribes when collected: let that happen now, while Redis
    # still runs, rather than at exit.
    gc.collect()
    app.close()
    return answers, not_asked


def handler_runs(runs_dir: Path) -> tuple[dict[tuple[str, int], list[Run]], set[tuple[str, int]]]:
    """(job_id, attempt) -> the (node, pid) of every execution started, in order; and the
    (job_id, attempt) pairs the handler ran to their end."""
    starts: dict[tuple[str, int], list[Run]] = {}
    ends: set[tuple[str, int]] = set()
    for path in sorted(runs_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a SIGKILL (not expected: one write per line)
            if entry["event"] == "start":
                starts.setdefault((entry["job_id"], entry["attempt"]), []).append((entry["node"], entry["pid"]))
            else:
                ends.add((entry["job_id"], entry["attempt"]))
    return starts, ends


def records(r: redis.Redis, job_ids: list[str]) -> dict[str, Record]:
    """job id -> (state, attempts) from the dispatcher's records."""
    found: dict[str, Record] = {}
    for chunk in chunks(job_ids, 1000):
        pipe = r.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(KEYS.job(job_id), "state", "attempts")
        for job_id, (state, attempts) in zip(chunk, pipe.execute(), strict=True):
            found[job_id] = (state, json.loads(attempts or "[]"))
    return found


def fleet_figures(r: redis.Redis) -> dict[str, Any]:
    """Assignments left, nodes whose slots are not all free, leftovers in the job queues."""
    # Replies are str: the client decodes them (decode_responses), which redis-py's types do not know.
    assigned_left: dict[str, list[str]] = {}
    for key in r.scan_iter(match=f"{KEYS.prefix}:node:*:assigned", count=1000):
        jobs = cast(list[str], r.hkeys(key))
        if jobs:
            assigned_left[key] = jobs
    statuses: Counter[str] = Counter()
    not_free: dict[str, Any] = {}
    for node_id in cast(list[str], r.zrange(KEYS.nodes(), 0, -1)):
        status = cast(str | None, r.hget(KEYS.node(node_id), "status")) or "missing"
        statuses[status] += 1
        if status == "ready":
            # The score is the load (assigned / max_concurrent_jobs) plus a tie-break below 1e-4
            # (when the node last took or freed a slot): absent or past 1e-4, a slot is busy.
            score = r.zscore(KEYS.capacity_index(), node_id)
            if score is None or score >= 1e-4:
                not_free[node_id] = score
    leftovers = {name: r.zcard(key) for name, key in (("waiting", KEYS.waiting()), ("deadlines", KEYS.deadlines()))}
    leftovers["results_unapplied"] = unapplied(r, KEYS.results())
    return {"assigned_left": assigned_left, "statuses": statuses, "not_free": not_free, "leftovers": leftovers}


def stuck_in_broker(r: redis.Redis, job_ids: list[str]) -> dict[str, str]:
    """Where the submit_job message of a job without a record is: kombu's unacked hash (a killed
    worker had taken it; it comes back after the visibility timeout) or still queued."""
    where: dict[str, str] = {}
    unacked: dict[str, str] = r.hgetall("unacked")  # type: ignore[assignment]
    queued: list[str] = r.lrange("celery", 0, -1)  # type: ignore[assignment]
    for job_id in job_ids:
        if any(job_id in message for message in unacked.values()):
            where[job_id] = UNACKED
        elif any(job_id in message for message in queued):
            where[job_id] = "queued"
        else:
            where[job_id] = NOWHERE
    return where


def scans_discarded(system: System) -> int:
    """dispatcher.scan_nodes messages the workers threw away unrun (their expiry had passed)."""
    needle = "Discarding revoked task: dispatcher.scan_nodes"
    return sum(proc.log_path.read_text(errors="replace").count(needle) for proc in system.workers)


@dataclass
class Evidence:
    """Everything read after the chaos, and the checks made of it."""

    answers: dict[str, Any]
    gets_not_asked: int
    recs: dict[str, Record]
    fleet: dict[str, Any]
    checks: dict[str, Any]
    broker: dict[str, str]


def read_evidence(system: System, job_ids: list[str], watch: StateWatch, get_timeout_s: float,
                  nodes: int) -> Evidence:
    answers, gets_not_asked = read_results(system.store.url, job_ids, watch, get_timeout_s)
    r = redis.Redis.from_url(system.store.url, decode_responses=True, socket_timeout=30)
    # Nodes killed late may still be warming up: their capacity is judged once they are ready.
    wait_nodes_ready(r, nodes, timeout_s=30)
    recs = records(r, job_ids)
    fleet = fleet_figures(r)
    runs, ends = handler_runs(system.tmp / "runs")
    checks = evaluate(job_ids, answers, recs, watch, runs, ends)
    broker = stuck_in_broker(r, checks["missing"]) if checks["missing"] else {}
    return Evidence(answers, gets_not_asked, recs, fleet, checks, broker)


# --- the checks ----------------------------------------------------------------------


def evaluate(job_ids: list[str], answers: dict[str, Any], recs: dict[str, Record], watch: StateWatch,
             runs: dict[tuple[str, int], list[Run]], ends: set[tuple[str, int]]) -> dict[str, Any]:
    outcomes: Counter[str] = Counter()
    unanswered, missing, not_final, twice, wrong = [], [], [], [], []
    for n, job_id in enumerate(job_ids):
        answer = answers.get(job_id)
        state, attempts = recs[job_id]
        outcomes[answer[0] if answer else "UNANSWERED"] += 1
        if answer is None:
            unanswered.append(job_id)
        if state is None:
            missing.append(job_id)
        elif state not in FINAL_JOB_STATES:
            not_final.append(job_id)
        succeeded = [a for a in attempts if a.get("outcome") == "succeeded"]
        if len(succeeded) > 1 or job_id in watch.changed:
            twice.append(job_id)
        if answer and answer[0] == "SUCCESS":
            output = answer[1]
            ok_attempt = succeeded[-1]["attempt"] if succeeded else None
            if not isinstance(output, dict) or output.get("n") != n or output.get("attempt") != ok_attempt:
                wrong.append(job_id)
    # An attempt the handler ran to its end but the dispatcher ended otherwise (timeout, node
    # lost): the node's result was not used and the job ran again.
    finished_but_retried: dict[tuple[str, int], str] = {}
    retried: Counter[str] = Counter()
    for job_id in job_ids:
        for entry in recs[job_id][1]:
            outcome = entry.get("outcome")
            if outcome not in (None, "succeeded"):
                retried[outcome] += 1
                attempt = entry.get("attempt")
                if isinstance(attempt, int) and (job_id, attempt) in ends:
                    finished_but_retried[(job_id, attempt)] = outcome
    lost = sorted(set(unanswered) | set(missing) | set(not_final))
    # Why a (job, attempt) ran twice: one agent process ran it twice (its dedupe failed), two
    # nodes ran it (the dispatcher sent one attempt to two nodes), or one node ran it again
    # after a restart (a crash empties the agent's memory of what it ran).
    ran_twice = {pair: who for pair, who in runs.items() if len(who) > 1}
    same_process = {pair: who for pair, who in ran_twice.items() if len(set(who)) < len(who)}
    two_nodes = {pair: who for pair, who in ran_twice.items() if len({node for node, _ in who}) > 1}
    attempts_hist = Counter(len(recs[j][1]) for j in job_ids)
    return {
        "outcomes": dict(outcomes), "unanswered": unanswered, "missing": missing, "not_final": not_final,
        "lost": lost, "completed_twice": twice, "wrong_output": wrong, "ran_twice": ran_twice,
        "ran_twice_same_process": same_process, "ran_twice_two_nodes": two_nodes,
        "attempts_hist": dict(sorted(attempts_hist.items())),
        "retried_attempts": dict(retried), "finished_but_retried": finished_but_retried,
    }


def figures_of(args: argparse.Namespace, system: System, submitter: Submitter, watch: StateWatch,
               ev: Evidence, bench_t0: float) -> dict[str, Any]:
    """The run's figures, as the JSON line prints them."""
    checks, fleet, supervisor = ev.checks, ev.fleet, system.supervisor
    end_s = watch.all_final_s or watch.last_final_s or time.monotonic()
    wall_s = end_s - submitter.started_s
    finished = sum(1 for j in watch.job_ids if ev.recs[j][0] in FINAL_JOB_STATES)
    lost_where = Counter(ev.broker.values())
    return {
        "jobs": args.jobs, "nodes": args.nodes, "seed": args.seed, "minutes": args.minutes, "webs": len(system.webs),
        "submitted": submitter.sent, "not_submitted": len(submitter.gave_up), "submit_retries": submitter.retries,
        "resent_for_want_of_an_answer": len(submitter.resent),
        "jobs_lost": len(checks["lost"]), "get_unanswered": len(checks["unanswered"]),
        "gets_not_asked": ev.gets_not_asked,
        "records_missing": len(checks["missing"]), "records_not_final": len(checks["not_final"]),
        "missing_submit_in_unacked": lost_where.get(UNACKED, 0), "missing_submit_nowhere": lost_where.get(NOWHERE, 0),
        "completed_twice": len(checks["completed_twice"]),
        "ran_twice_same_attempt": len(checks["ran_twice"]),
        "ran_twice_same_process": len(checks["ran_twice_same_process"]),
        "ran_twice_two_nodes": len(checks["ran_twice_two_nodes"]),
        "ran_twice_across_restart": len(set(checks["ran_twice"]) - set(checks["ran_twice_same_process"])
                                        - set(checks["ran_twice_two_nodes"])),
        "outcomes": checks["outcomes"], "wrong_output": len(checks["wrong_output"]),
        "attempts_per_job": {str(k): v for k, v in checks["attempts_hist"].items()},
        "retried_attempts": checks["retried_attempts"],
        "finished_attempts_retried": len(checks["finished_but_retried"]),
        "scans_discarded_expired": scans_discarded(system),
        "peaks": watch.peaks,
        "assignment_records_left": sum(len(v) for v in fleet["assigned_left"].values()),
        "slots_not_free": len(fleet["not_free"]), "nodes_by_status": dict(fleet["statuses"]),
        "leftovers": fleet["leftovers"],
        "unexpected_exits": len(supervisor.unexpected), "kills": dict(supervisor.kills),
        "restarts": dict(supervisor.restarts),
        "wall_time_s": round(wall_s, 1), "jobs_per_s": round(finished / wall_s, 1) if wall_s > 0 else 0.0,
        "bench_time_s": round(time.monotonic() - bench_t0, 1), "logs": str(system.tmp),
    }


def detail_of(supervisor: Supervisor, submitter: Submitter, watch: StateWatch, ev: Evidence) -> dict[str, Any]:
    """The jobs and records behind the figures that call for a look, by title."""
    checks, recs, answers = ev.checks, ev.recs, ev.answers
    failures = Counter(a[0] for a in answers.values() if a and a[0] != "SUCCESS")
    return {
        "unexpected exits": [json.dumps(u) for u in supervisor.unexpected],
        "sent again for want of an answer (kombu lost the first message)": submitter.resent,
        "jobs lost (job: state, attempts, broker)": [
            f"{j}: {recs[j][0]}, {recs[j][1]}, {ev.broker.get(j, '')}" for j in checks["lost"]],
        "completed twice": [f"{j}: {watch.changed.get(j)} {recs[j][1]}" for j in checks["completed_twice"]],
        "ran twice, same attempt ((job, attempt): [(node, pid)])": [
            f"{pair}: {who}" for pair, who in checks["ran_twice"].items()],
        "wrong output": [f"{j}: {answers[j]}" for j in checks["wrong_output"]],
        "attempts the node finished that were ended otherwise ((job, attempt): outcome)": [
            f"{pair}: {outcome}" for pair, outcome in checks["finished_but_retried"].items()],
        "assignments left": [f"{k}: {v}" for k, v in ev.fleet["assigned_left"].items()],
        "ready nodes with busy slots (capacity score)": [f"{k}: {v}" for k, v in ev.fleet["not_free"].items()],
        "failure examples": [f"{name}: {next(a[1] for a in answers.values() if a and a[0] == name)[:300]}"
                             for name in failures],
    }


def failed(figures: dict[str, Any]) -> bool:
    return any(figures[name] for name in FAILING) or any(figures["leftovers"].values())


# --- the report ---------------------------------------------------------------------


def report(figures: dict[str, Any], detail: dict[str, Any]) -> None:
    rows = [
        ("jobs submitted / given up", (f"{figures['submitted']} / {figures['not_submitted']} "
                                       f"({figures['submit_retries']} retried sends)")),
        ("sent again for want of an answer", figures["resent_for_want_of_an_answer"]),
        ("outcomes (get)", ", ".join(f"{k} {v}" for k, v in sorted(figures["outcomes"].items()))),
        ("attempts per job", ", ".join(f"{k}: {v}" for k, v in figures["attempts_per_job"].items())),
        ("attempts ended without success", ", ".join(f"{k} {v}" for k, v in sorted(figures["retried_attempts"].items()))
         + f" (of which the node had finished: {figures['finished_attempts_retried']})"),
        ("scan_nodes discarded unrun (expired)", figures["scans_discarded_expired"]),
        ("peaks (every 2 s, probe.log)", ", ".join(f"{k} {v}" for k, v in figures["peaks"].items())),
        ("jobs_lost", figures["jobs_lost"]),
        ("  get() unanswered", (f"{figures['get_unanswered']} (not asked, the job never ended: "
                                f"{figures['gets_not_asked']})")),
        ("  record missing / not final", f"{figures['records_missing']} / {figures['records_not_final']}"),
        ("  missing: submit unacked / nowhere", (f"{figures['missing_submit_in_unacked']} / "
                                                 f"{figures['missing_submit_nowhere']}")),
        ("completed_twice", figures["completed_twice"]),
        ("ran_twice_same_attempt", (f"{figures['ran_twice_same_attempt']} "
                                    f"(in one agent process: {figures['ran_twice_same_process']}, "
                                    f"on two nodes: {figures['ran_twice_two_nodes']}, "
                                    f"by one node across its restart: {figures['ran_twice_across_restart']})")),
        ("wrong_output", figures["wrong_output"]),
        ("assignment_records_left", figures["assignment_records_left"]),
        ("slots_not_free (ready nodes)", figures["slots_not_free"]),
        ("nodes by status", ", ".join(f"{k} {v}" for k, v in sorted(figures["nodes_by_status"].items()))),
        ("leftovers", ", ".join(f"{k} {v}" for k, v in figures["leftovers"].items())),
        ("kills", ", ".join(f"{k} {v}" for k, v in sorted(figures["kills"].items()))),
        ("restarts", ", ".join(f"{k} {v}" for k, v in sorted(figures["restarts"].items()))),
        ("unexpected_exits", figures["unexpected_exits"]),
        ("wall time (first submit -> last job ended)", f"{figures['wall_time_s']:.1f} s"),
        ("jobs/s", f"{figures['jobs_per_s']:.1f}"),
        ("bench time", f"{figures['bench_time_s']:.1f} s"),
        ("logs", figures["logs"]),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for title, items in detail.items():
        if items:
            print(f"\n  {title}:")
            for item in list(items)[:10]:
                print(f"    {item}")
            if len(items) > 10:
                print(f"    ... {len(items) - 10} more")
    print(json.dumps(figures, sort_keys=True), flush=True)
