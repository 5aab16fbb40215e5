"""Hostile clients against one web process, while an honest node keeps working.

    python bench/hostile.py                              # every case, 20 s each
    python bench/hostile.py --cases baseline,flood --case-seconds 10

Starts a private redis-server and the Procfile's web (one gunicorn gevent
worker), worker (concurrency 2) and beat, configured WITH registration tokens
(``["honest-token"]``), so the attackers have none. An honest in-process node
(the token, a heartbeat a second, job_ack at once and job_result ~10 ms later,
resuming whenever its session ends) serves an honest client that submits one
small job every 0.5 s (open loop: a slow job never delays the next) and times
submit -> result.

The honest client submits to a queue of its own (``--honest-queue``, default
"interactive", named in ``priority_queues``), as docs/security.md tells a client
that must not wait behind another's flood. Celery's default queue is one line
in arrival order: a second client on it is measured beside the first ("shared
queue") and not checked, so that each run shows what a flood costs it.

Beside them the bench probes GET /healthz every 0.25 s, GET
/api/nodes every 2 s (as the fleet page does), a NEW honest registration
every few seconds, and samples the gunicorn worker's RSS, CPU and fds.

Each case: a quiet baseline, then the attack for --case-seconds, then the
attack torn down and a few seconds of recovery. Attackers run in a child
process of their own (this script with ``--attack``), from 127.0.0.2 ...
127.0.0.250, so their CPU and GIL never slow the honest node's event loop,
and a per-address limit in the product would not catch the honest node.

  baseline      no attack
  unread        20 clients send 64 KiB junk frames as fast as they can and never read
  idle          5,000 unauthenticated sessions that do nothing (but answer pings)
  flood         one session sends 2,000 frames/s (heartbeats before registering, junk), reading replies
  submissions   10,000 jobs at once that no node can take (they expire during the case)
  token_holder  a token holder registers 2,000 nodes with the largest record allowed (~70 KB: every
                list and field at its bound; one in ten with more, refused), then closes them

A case stops early when the web worker's RSS passes --rss-cap-mb or the
machine's available memory drops below --min-available-mb. When the system
has not recovered after a case (stopped at the cap, web worker gone or still
--rss-growth-limit-mb larger than at its start, /healthz failing, Celery's
queue still backed up, the last honest jobs failing or slow, the honest node
not ready), it is restarted before the next case, so that each case measures
its own attack.

Prints one block per case, a table, and as the very last line one JSON object
with every figure. Exits 1 when in any case, during the attack, the honest p99
is >= 1000 ms, an honest job failed (or none completed) or /healthz failed
(no answer within --healthz-timeout-seconds); also when a new honest node
could not register (within 15 s), the memory cap stopped the case, the web
worker grew by more than --rss-growth-limit-mb, or honest jobs or /healthz
still failed during the recovery after the attack.
"""

# The parts: hostile_system.py (the processes), hostile_probes.py (the measurements),
# hostile_honest.py (the honest node, client and registrations), hostile_harness.py (all of
# them together, and one case run against them), hostile_attacks.py (the attacker child, this
# script with --attack), hostile_report.py (summaries, checks, printing).

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from common import raise_open_files_limit
from hostile_attacks import ATTACKER_ADDRESSES, ATTACKS, run_attacker
from hostile_harness import CaseSpec, Harness, run_case
from hostile_probes import now_s
from hostile_report import print_case, print_table
from hostile_system import GROUPS, HONEST_TOKEN, System

CASE_NAMES = ["baseline", "unread", "idle", "flood", "submissions", "token_holder"]


def case_specs(args: argparse.Namespace, system: System) -> dict[str, CaseSpec]:
    """What each case is, and what its attacker child is told."""
    ws, redis_url = ["--ws-url", system.ws_url], ["--redis-url", system.redis_url]
    return {spec.name: spec for spec in [
        CaseSpec("baseline", "no attack", None),
        CaseSpec("unread", f"{args.unread_clients} clients send {args.unread_frame_kib} KiB junk frames (an unknown "
                           "type) as fast as they can and never read",
                 ["unread", *ws, "--count", str(args.unread_clients), "--frame-kib", str(args.unread_frame_kib)]),
        CaseSpec("idle", f"{args.idle_sessions} unauthenticated sessions that do nothing, "
                         f"from {len(ATTACKER_ADDRESSES)} addresses",
                 ["idle", *ws, "--count", str(args.idle_sessions)]),
        CaseSpec("flood", f"one session sends {args.flood_rate} frames/s (heartbeats before registering, junk), "
                          "reading replies",
                 ["flood", *ws, "--rate", str(args.flood_rate)]),
        CaseSpec("submissions", f"{args.submissions} jobs at once that no node can take (dispatch timeout "
                                f"{args.submissions_dispatch_timeout:g} s)",
                 ["submit", *redis_url, "--count", str(args.submissions),
                  "--dispatch-timeout", str(args.submissions_dispatch_timeout)]),
        CaseSpec("token_holder", f"a token holder registers {args.big_nodes} nodes with the largest record "
                                 "allowed (~70 KB; one in ten larger, refused), then closes them; /api/nodes "
                                 "polled every 2 s",
                 ["bignodes", *ws, "--count", str(args.big_nodes), "--token", HONEST_TOKEN]),
    ]}


def parse_settings(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def case_names(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASE_NAMES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose among {CASE_NAMES}")
    return names


def run_bench(args: argparse.Namespace) -> int:
    nofile = raise_open_files_limit()
    names = case_names(args)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    print(f"logs: {log_dir}   RLIMIT_NOFILE {nofile}   cores {psutil.cpu_count()}", file=sys.stderr, flush=True)
    extra_settings = parse_settings(args.set)
    if args.honest_queue:
        # The honest client's own lane, read before the default queue every attacker shares.
        extra_settings["priority_queues"] = json.dumps([args.honest_queue])
    results: list[dict[str, Any]] = []
    generation = 0
    harness = Harness(args, log_dir / f"system-{generation}", extra_settings)
    aborted = None
    try:
        harness.start()
        print(f"settings: {json.dumps(harness.system.settings)}", flush=True)
        for name in names:
            spec = case_specs(args, harness.system)[name]
            print(f"case {name}: {spec.describe}", file=sys.stderr, flush=True)
            harness.trim_before(now_s())
            result = run_case(harness, spec, args, harness.system.log_dir)
            results.append(result)
            reason = None
            if name != names[-1]:
                reason = ("fresh system per case" if args.fresh_system_per_case
                          else harness.unhealthy_reason(result))
                result["restarted_after"] = reason
            print_case(result)
            sys.stdout.flush()
            if reason:
                harness.stop()
                generation += 1
                harness = Harness(args, log_dir / f"system-{generation}", extra_settings)
                harness.start()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the cases done so far are still reported
        aborted = f"{type(exc).__name__}: {exc}"
        print(f"bench aborted: {aborted}", file=sys.stderr, flush=True)
    finally:
        harness.stop()
        GROUPS.stop_all()
    print_table(results)
    failed = {r["case"]: r["checks_failed"] for r in results if r["checks_failed"]}
    print(f"\nlogs kept in {log_dir}")
    print(json.dumps({"ok": not failed and not aborted, "failed": failed, "aborted": aborted,
                      "settings": harness.system.settings, "case_seconds": args.case_seconds,
                      "cases": {r["case"]: r for r in results}}), flush=True)
    return 1 if failed or aborted else 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASE_NAMES), help=f"comma-separated, among {CASE_NAMES}")
    p.add_argument("--case-seconds", type=float, default=20.0, help="attack duration of each case")
    p.add_argument("--quiet-seconds", type=float, default=3.0, help="quiet baseline before each attack")
    p.add_argument("--recovery-seconds", type=float, default=5.0, help="after each attack, before the next case")
    p.add_argument("--probe-every-seconds", type=float, default=5.0, help="a new honest registration this often")
    p.add_argument("--healthz-timeout-seconds", type=float, default=2.0, help="a slower /healthz is a failure")
    p.add_argument("--rss-cap-mb", type=float, default=4096.0, help="stop a case when the web worker passes this")
    p.add_argument("--min-available-mb", type=float, default=2048.0,
                   help="stop a case when the machine's available memory drops below this")
    p.add_argument("--rss-growth-limit-mb", type=float, default=512.0,
                   help="a case fails when the web worker grows by more than this during the attack")
    p.add_argument("--fresh-system-per-case", action="store_true", help="restart the system after every case")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a dispatcher setting (repeatable), e.g. --set web_worker_connections=10000")
    p.add_argument("--honest-queue", default="interactive",
                   help="the honest client submits to this Celery queue, which the workers read first "
                        "(priority_queues), and a second client, measured but not checked, to the shared one; "
                        "'' puts the honest client on the shared queue alone")
    p.add_argument("--unread-clients", type=int, default=20)
    p.add_argument("--unread-frame-kib", type=int, default=64)
    p.add_argument("--idle-sessions", type=int, default=5000)
    p.add_argument("--flood-rate", type=int, default=2000, help="frames per second")
    p.add_argument("--submissions", type=int, default=10000)
    p.add_argument("--submissions-dispatch-timeout", type=float, default=15.0)
    p.add_argument("--big-nodes", type=int, default=2000)
    # The attacker child's own options (this script with --attack KIND).
    p.add_argument("--attack", choices=sorted(ATTACKS), help=argparse.SUPPRESS)
    p.add_argument("--ws-url", help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--frame-kib", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--rate", type=int, default=2000, help=argparse.SUPPRESS)
    p.add_argument("--dispatch-timeout", type=float, default=15.0, help=argparse.SUPPRESS)
    p.add_argument("--token", default=HONEST_TOKEN, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.attack:
        run_attacker(args)
        return
    # SIGTERM ends the bench like Ctrl-C does: through the finally blocks that stop every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        code = run_bench(args)
    finally:
        GROUPS.stop_all()
    sys.exit(code)


if __name__ == "__main__":
    main()
