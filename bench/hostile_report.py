"""What bench/hostile.py makes of a case: its window summarised, the checks, the printed report."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import urllib.error
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import pct
from hostile_honest import JobRecord, RegistrationProbes
from hostile_probes import HTTP, WebWatch

if TYPE_CHECKING:
    from hostile_harness import CaseSpec, Harness

#: An honest job slower than this fails the case (p99).
HONEST_P99_LIMIT_MS = 1000.0


@dataclass
class Window:
    """The moments (time.time()) that cut a case: quiet, attack, recovery."""

    quiet_s: float
    attack_s: float
    end_s: float
    recovered_s: float


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def latency_figures(values_ms: list[float]) -> dict[str, float | None]:
    """p50 / p99 / max, in ms (None when there is nothing to measure)."""
    if not values_ms:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"p50_ms": rounded(statistics.median(values_ms)), "p99_ms": rounded(pct(values_ms, 0.99)),
            "max_ms": rounded(max(values_ms))}


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


# --- the web process's log -------------------------------------------------------------


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def web_log_events(path: Path, offset: int, limit_bytes: int = 64 << 20) -> dict[str, Any]:
    """What the web process logged from ``offset`` on (its JSON lines): events by name, GC pauses."""
    events: Counter[str] = Counter()
    pauses_ms: list[int] = []
    try:
        with path.open("rb") as f:
            f.seek(offset)
            read = 0
            for line in f:
                read += len(line)
                if read > limit_bytes:
                    events["(log truncated here)"] += 1
                    break
                try:
                    entry = json.loads(line)
                except ValueError:
                    events["(not JSON)"] += 1
                    continue
                events[str(entry.get("event") or entry.get("message", "?"))[:60]] += 1
                if entry.get("event") == "gc_pause":
                    pauses_ms.append(int(entry.get("pause_ms", 0)))
    except OSError:
        pass
    return {"events": dict(events.most_common(8)), "gc_pauses": len(pauses_ms),
            "gc_pause_max_ms": max(pauses_ms, default=None), "gc_pause_total_ms": sum(pauses_ms)}


# --- summaries of a window -------------------------------------------------------------


def summarize_jobs(records: list[JobRecord], http_url: str | None = None) -> dict[str, Any]:
    ok_ms = [r.latency_ms for r in records if r.done and r.error is None and r.latency_ms is not None]
    failed = [r for r in records if not r.done or r.error is not None]
    summary: dict[str, Any] = {"n": len(records), **latency_figures(ok_ms), "failures": len(failed),
               "failure_examples": sorted(Counter((r.error or "no answer").split(":")[0] for r in failed).items())[:5]}
    if failed and http_url:
        summary["failed_job_states"] = failed_job_states(failed, http_url)
    return summary


def failed_job_states(failed: list[JobRecord], http_url: str, sample: int = 10) -> dict[str, int]:
    """Where some failed jobs are now (GET /api/jobs/<id>): "not recorded" means the worker never
    ran their submit_job; "waiting" means it did but no node was given the job."""
    states: Counter[str] = Counter()
    for record in failed[:sample]:
        if record.job_id is None:
            states["never submitted"] += 1
            continue
        try:
            with HTTP.open(f"{http_url}/api/jobs/{record.job_id}", timeout=5) as response:
                states[json.loads(response.read()).get("state", "?")] += 1
        except urllib.error.HTTPError as exc:
            states["not recorded" if exc.code == 404 else f"HTTP {exc.code}"] += 1
        except Exception as exc:  # noqa: BLE001
            states[type(exc).__name__] += 1
    return dict(states)


def summarize_http(samples: list[tuple[float, int, str | None]]) -> dict[str, Any]:
    # A failed probe counts with the time it took to fail: it belongs in the tail.
    latencies_ms = [ms for ms, _, _ in samples]
    errors = [error for _, _, error in samples if error]
    return {"n": len(samples), **latency_figures(latencies_ms), "failures": len(errors),
            "max_bytes": max((size for _, size, _ in samples), default=0),
            "errors": sorted(Counter(e.split(":")[0] for e in errors).items())[:5]}


def summarize_node(h: Harness, t0_s: float, t1_s: float) -> dict[str, Any]:
    events = h.node.events.between(t0_s, t1_s)
    closes = [detail for kind, detail in events if kind == "close"]
    lag_ms = h.node.loop_lag.between(t0_s, t1_s)
    return {
        "session_closes": len(closes),
        "close_codes": sorted(Counter(str(c) for c in closes).items()),
        "connect_failures": sum(1 for kind, _ in events if kind == "connect_failed"),
        "resumes": sum(1 for kind, _ in events if kind == "resumed"),
        "statuses": sorted(Counter(detail for kind, detail in events if kind == "status").items()),
        "error_frames": sorted(Counter(str(detail) for kind, detail in events if kind == "error").items()),
        "bench_loop_lag_max_ms": rounded(max(lag_ms, default=0.0)),
    }


def summarize_web(h: Harness, w: Window) -> dict[str, Any]:
    watch = h.watch.samples
    before = watch.last_before(w.attack_s) or {}
    at_end = watch.last_before(w.end_s) or {}
    after = watch.last_before(w.recovered_s) or {}
    during = watch.between(w.attack_s, w.end_s)
    pids = {s["pid"] for s in watch.between(w.quiet_s, w.recovered_s) if s["pid"] is not None}
    return {
        "rss_before_mb": rounded(before.get("rss_mb")),
        "rss_peak_mb": rounded(max((s["rss_mb"] for s in during if s["rss_mb"] is not None), default=None)),
        "rss_end_mb": rounded(at_end.get("rss_mb")),
        "rss_after_recovery_mb": rounded(after.get("rss_mb")),
        "cpu_percent": rounded(cpu_percent(during)),
        "fds_peak": max((s["fds"] for s in during if s["fds"] is not None), default=None),
        "worker_pids": len(pids),  # more than one: gunicorn replaced a dead or stuck worker
        "redis_rss_peak_mb": rounded(max((s["redis_rss_mb"] or 0 for s in during), default=None)),
    }


def cpu_percent(samples: list[dict[str, Any]]) -> float | None:
    """The worker's CPU over the window (one core = 100), from its first to its last sample."""
    if not samples:
        return None
    same = [s for s in samples if s["pid"] is not None and s["pid"] == samples[-1]["pid"]]
    if len(same) < 2:
        return None
    first, last = same[0], same[-1]
    wall_s = WebWatch.EVERY_S * (len(same) - 1)  # samples are this far apart (closely enough for a percentage)
    return (last["cpu_s"] - first["cpu_s"]) / wall_s * 100 if wall_s else None


def summarize_case(h: Harness, spec: CaseSpec, w: Window, probes: RegistrationProbes,
                   attacker_status: dict[str, Any], ended_by: str) -> dict[str, Any]:
    registrations = probes.samples.between(w.attack_s, w.end_s)
    return {
        "case": spec.name,
        "describe": spec.describe,
        "ended_by": ended_by,
        "attack_seconds": rounded(w.end_s - w.attack_s),
        "honest": summarize_jobs(h.client.between(w.attack_s, w.end_s), h.system.http_url),
        "honest_quiet": summarize_jobs(h.client.between(w.quiet_s, w.attack_s)),
        "honest_recovery": summarize_jobs(h.client.between(w.end_s, w.recovered_s)),
        # Not checked: the shared queue is one line, so a flood of submissions delays it.
        "shared_queue_client": (None if h.shared_client is None
                                else summarize_jobs(h.shared_client.between(w.attack_s, w.end_s))),
        "node": summarize_node(h, w.attack_s, w.recovered_s),
        "healthz": summarize_http(h.healthz.samples.between(w.attack_s, w.end_s)),
        "healthz_recovery": summarize_http(h.healthz.samples.between(w.end_s, w.recovered_s)),
        "api_nodes": summarize_http(h.nodes_api.samples.between(w.attack_s, w.end_s)),
        "registration": {
            "n": len(registrations),
            **latency_figures([ms for ms, _ in registrations if ms is not None]),
            "failures": sum(1 for ms, _ in registrations if ms is None),
            "errors": sorted(Counter((e or "").split(":")[0] for ms, e in registrations if ms is None).items()),
        },
        "web": summarize_web(h, w),
        "attacker": attacker_status,
    }


# --- the checks --------------------------------------------------------------------------


def failed_checks(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    honest, healthz = result["honest"], result["healthz"]
    failed = []
    if honest["n"] == 0 or honest["p99_ms"] is None:
        failed.append("no honest job completed")
    elif honest["p99_ms"] >= HONEST_P99_LIMIT_MS:
        failed.append(f"honest p99 {honest['p99_ms']:.0f} ms >= {HONEST_P99_LIMIT_MS:.0f} ms")
    if honest["failures"]:
        failed.append(f"{honest['failures']} honest jobs failed")
    if healthz["failures"]:
        failed.append(f"/healthz failed {healthz['failures']} of {healthz['n']} times")
    registration = result["registration"]
    if registration["failures"]:
        failed.append(f"{registration['failures']} of {registration['n']} new honest registrations failed")
    if result["ended_by"].startswith("stopped"):
        failed.append("memory cap")
    web = result["web"]
    if web["rss_peak_mb"] is not None and web["rss_before_mb"] is not None:
        growth_mb = web["rss_peak_mb"] - web["rss_before_mb"]
        if growth_mb > args.rss_growth_limit_mb:
            failed.append(f"web worker RSS grew by {growth_mb:.0f} MiB > {args.rss_growth_limit_mb:.0f} MiB")
    # The attack is over: what fails now is damage it left behind.
    if result["honest_recovery"]["failures"]:
        failed.append(f"{result['honest_recovery']['failures']} honest jobs failed after the attack")
    if result["healthz_recovery"]["failures"]:
        failed.append(f"/healthz failed {result['healthz_recovery']['failures']} times after the attack")
    return failed


# --- printing ------------------------------------------------------------------------------


def print_case(r: dict[str, Any]) -> None:
    hj, node, hz, api, reg, web = r["honest"], r["node"], r["healthz"], r["api_nodes"], r["registration"], r["web"]
    print(f"\n== {r['case']}: {r['describe']} ==")
    print(f"  attack          {r['attack_seconds']} s, ended by: {r['ended_by']}")
    states = ""
    if hj.get("failed_job_states"):
        states = f"  states of failed jobs now: {json.dumps(hj['failed_job_states'])}"
    print(f"  honest jobs     n={hj['n']}  p50 {fmt_ms(hj['p50_ms'])} ms  p99 {fmt_ms(hj['p99_ms'])} ms  "
          f"max {fmt_ms(hj['max_ms'])} ms  failures {hj['failures']} {hj['failure_examples'] or ''}{states}")
    q, rec = r["honest_quiet"], r["honest_recovery"]
    print(f"    (quiet before: n={q['n']} p99 {fmt_ms(q['p99_ms'])} ms; recovery after: n={rec['n']} "
          f"p99 {fmt_ms(rec['p99_ms'])} ms, failures {rec['failures']})")
    if (shared := r.get("shared_queue_client")) is not None:
        print(f"  shared queue    n={shared['n']}  p50 {fmt_ms(shared['p50_ms'])} ms  "
              f"p99 {fmt_ms(shared['p99_ms'])} ms  max {fmt_ms(shared['max_ms'])} ms  "
              f"failures {shared['failures']}  (a client on Celery's default queue: not checked)")
    print(f"  honest node     (attack + recovery) session closes {node['session_closes']} {node['close_codes'] or ''}  "
          f"connect failures {node['connect_failures']}  resumes {node['resumes']}  statuses {node['statuses']}  "
          f"error frames {node['error_frames']}  bench loop lag max {fmt_ms(node['bench_loop_lag_max_ms'])} ms")
    print(f"  /healthz        n={hz['n']}  p50 {fmt_ms(hz['p50_ms'])} ms  p99 {fmt_ms(hz['p99_ms'])} ms  "
          f"max {fmt_ms(hz['max_ms'])} ms  failures {hz['failures']} {hz['errors'] or ''}  "
          f"(recovery: failures {r['healthz_recovery']['failures']} of {r['healthz_recovery']['n']})")
    print(f"  /api/nodes      n={api['n']}  p50 {fmt_ms(api['p50_ms'])} ms  p99 {fmt_ms(api['p99_ms'])} ms  "
          f"max {fmt_ms(api['max_ms'])} ms  size max {api['max_bytes'] / 2**20:.2f} MiB  failures {api['failures']}")
    print(f"  new register    n={reg['n']}  p50 {fmt_ms(reg['p50_ms'])} ms  max {fmt_ms(reg['max_ms'])} ms  "
          f"failures {reg['failures']} {reg['errors'] or ''}")
    print(f"  web worker      RSS {web['rss_before_mb']} -> peak {web['rss_peak_mb']} -> end {web['rss_end_mb']} MiB "
          f"(after recovery {web['rss_after_recovery_mb']})  CPU {web['cpu_percent']}%  fds peak {web['fds_peak']}  "
          f"worker pids {web['worker_pids']}  redis RSS peak {web['redis_rss_peak_mb']} MiB")
    log = r["web_log"]
    print(f"  web log (a+r)   {json.dumps(log['events'])}  GC pauses {log['gc_pauses']} "
          f"(max {log['gc_pause_max_ms']} ms, total {log['gc_pause_total_ms']} ms)")
    if r["attacker"]:
        print(f"  attacker        {json.dumps(r['attacker'])}")
    if r.get("restarted_after"):
        print(f"  system          restarted after this case: {r['restarted_after']}")
    print(f"  verdict         {'FAIL: ' + '; '.join(r['checks_failed']) if r['checks_failed'] else 'ok'}")


def print_table(results: list[dict[str, Any]]) -> None:
    header = (f"{'case':13s} {'jobs':>4s} {'p50 ms':>7s} {'p99 ms':>7s} {'max ms':>7s} {'fail':>4s} {'closes':>6s} "
              f"{'hz p99':>7s} {'hz fail':>7s} {'reg max':>7s} {'RSS before->peak MiB':>21s} {'shared p99':>10s} "
              f"{'verdict'}")
    print("\n" + header)
    for r in results:
        hj, hz, web = r["honest"], r["healthz"], r["web"]
        rss = f"{web['rss_before_mb'] or 0:.0f}->{web['rss_peak_mb'] or 0:.0f}"
        reg = "FAIL" if r["registration"]["failures"] else fmt_ms(r["registration"]["max_ms"])
        shared = fmt_ms((r.get("shared_queue_client") or {}).get("p99_ms"))
        print(f"{r['case']:13s} {hj['n']:4d} {fmt_ms(hj['p50_ms']):>7s} {fmt_ms(hj['p99_ms']):>7s} "
              f"{fmt_ms(hj['max_ms']):>7s} {hj['failures']:4d} {r['node']['session_closes']:6d} "
              f"{fmt_ms(hz['p99_ms']):>7s} {hz['failures']:7d} {reg:>7s} {rss:>21s} {shared:>10s} "
              f"{'FAIL' if r['checks_failed'] else 'ok'}")
