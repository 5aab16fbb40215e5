"""The ``dispatcher`` command: run the system locally, look at the fleet and the
jobs, drain and cordon nodes, submit jobs, run a node agent.

Exit codes: 0 done; 1 the operation failed (a job failed or was cancelled, a
drain was refused); 2 bad usage; 3 no such node or job; 4 not authorized;
5 the dispatcher cannot be reached. Every error is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from dispatcher.errors import DispatcherError
from dispatcher.joblist import LIST_STATES
from dispatcher.vocabulary import CeleryState, ModelState, NodeStatus
from dispatcher.wording import ago, duration, plural

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNAUTHORIZED, EXIT_UNREACHABLE = 1, 2, 3, 4, 5


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def project_root() -> Path:
    """The checkout holding the Procfile: the working folder, or the one this package came from."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (candidate / "Procfile").is_file():
            return candidate
    raise CliError("no Procfile here: run `dispatcher up` from the project's checkout", EXIT_USAGE)


# --- talking to the web process ------------------------------------------------------


class Api:
    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read()).get("error", err.reason)
            except ValueError:
                message = str(err.reason)
            code = {401: EXIT_UNAUTHORIZED, 404: EXIT_NOT_FOUND}.get(err.code, EXIT_FAILED)
            hint = " (set DISPATCHER_ADMIN_TOKEN or --token)" if err.code == 401 else ""
            raise CliError(f"{message}{hint}", code) from err
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise CliError(f"cannot reach the dispatcher at {self.url}: {reason} (set DISPATCHER_URL or --url)",
                           EXIT_UNREACHABLE) from err


# --- output ----------------------------------------------------------------------------


def _seconds(at_ms: Any) -> float | None:
    """A time in ms since the epoch, in seconds; None when unknown, or when a corrupt record's
    is no number or past a float's range."""
    if not isinstance(at_ms, (int, float)):
        return None
    try:
        return at_ms / 1000
    except OverflowError:
        return None


def _since_s(at_ms: float | None) -> float | None:
    """Seconds from a time in ms since the epoch to now (None stays None)."""
    at_s = _seconds(at_ms)
    return None if at_s is None else time.time() - at_s


def _until_s(at_ms: float | None) -> float | None:
    at_s = _seconds(at_ms)
    return None if at_s is None else at_s - time.time()


def _gb(value: Any) -> str:
    """A size in GB as the node reported it ("?" for anything but a number)."""
    return f"{value:g}" if isinstance(value, (int, float)) else "?"


def _hardware(hardware: dict[str, Any]) -> tuple[str, str]:
    """The node's hardware in words: (cores and memory, its GPUs)."""
    gpus = hardware.get("gpus")
    named = [f"{g.get('name', '?')} {_gb(g.get('memory_gb'))} GB" for g in (gpus if isinstance(gpus, list) else [])
             if isinstance(g, dict)]
    return f"{hardware.get('cpu_cores', 0)} cores, {_gb(hardware.get('memory_gb', 0))} GB", ", ".join(named) or "none"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = ["   ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


def pages(api: Api, path: str, query: dict[str, str | None], key: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every item of a paged listing (following ``next_cursor``), and its last answer."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        given = {k: v for k, v in {**query, "cursor": cursor}.items() if v}
        answer = api.call("GET", path + ("?" + urllib.parse.urlencode(given) if given else ""))
        items += answer[key]
        cursor = answer.get("next_cursor")
        if not cursor:
            return items, answer


def show_nodes(api: Api, status: str | None) -> None:
    listed, answer = pages(api, "/api/nodes", {"status": status, "limit": "1000"}, "nodes")
    rows = []
    for n in listed:
        usage = n["resource_usage"]
        ready = sum(1 for m in n["models"] if m.get("status") == ModelState.READY)
        # A cordoned node keeps its status (like kubectl's Ready,SchedulingDisabled).
        shown_status = f"{n['status']}" + (",cordoned" if n.get("cordon") else "")
        rows.append([n["node_id"], shown_status, f"{len(n['assigned_jobs'])}/{n['max_concurrent_jobs']}",
                     _pct(usage["cpu_percent"]), _pct(usage["gpu_percent"]), _pct(usage["mem_percent"]),
                     f"{ready}/{len(n['models'])}", duration(n["last_heartbeat_age_s"], compact=True),
                     duration(_since_s(n["status_since_ms"]), compact=True), n["reason"][:60]])
    print(table(rows, ["NODE", "STATUS", "JOBS", "CPU", "GPU", "MEM", "MODELS", "HEARTBEAT", "IN STATUS", "REASON"]))
    counts = [f"{count} {s}" for s, count in answer["counts"].items() if count]
    print("\n" + (", ".join(counts) if counts else "no nodes"))


def show_jobs(api: Api, state: str | None, node_id: str | None, limit: int) -> None:
    """The newest jobs first, like ``dispatcher nodes``."""
    answer = api.call("GET", "/api/jobs?" + urllib.parse.urlencode(
        {k: v for k, v in {"state": state, "node": node_id, "limit": str(limit)}.items() if v}))
    rows = []
    for j in answer["jobs"]:
        outcome = j.get("outcome") or {}
        rows.append([j["job_id"], j["state"], j["job_type"] or "-", j["node_id"] or "-",
                     f"{j['attempt'] or 0}/{j['max_attempts'] or 0}", ago(_since_s(j["submitted_ms"])),
                     (outcome.get("text") or outcome.get("code") or "")[:60]])
    print(table(rows, ["JOB", "STATE", "TYPE", "NODE", "ATTEMPT", "SUBMITTED", "OUTCOME"]) if rows else "no jobs")
    if answer["next_cursor"]:
        print(f"\n(newest {plural(len(rows), 'job')} shown: --limit shows more)")


def show_node(api: Api, node_id: str, job_id: str | None) -> None:
    n = api.call("GET", f"/api/nodes/{node_id}")
    usage, health = n["resource_usage"], n["health"]
    print(f"Node:          {n['node_id']}")
    print(f"Status:        {n['status']} for {duration(_since_s(n['status_since_ms']))}: {n['reason']}")
    cordon = n.get("cordon")
    if cordon:
        print(f"Cordoned:      no new jobs ({ago(_since_s(cordon['at_ms']))}, by {cordon['requested_by']}): "
              f"{cordon['reason']}")
    print(f"Connected:     {'yes' if n['connected'] else 'no'} (web {n['web_id']}), last heartbeat "
          f"{ago(n['last_heartbeat_age_s'])}")
    print(f"Agent:         {n['version'] or '-'} (schema {n['capability_schema_version']})")
    machine, gpus = _hardware(n["hardware"])
    print(f"Hardware:      {machine}, GPUs: {gpus} (available: {'yes' if n['gpu_available'] else 'no'})")
    print(f"Usage:         cpu {_pct(usage['cpu_percent'])}, gpu {_pct(usage['gpu_percent'])}, "
          f"mem {_pct(usage['mem_percent'])}, running {usage['running_jobs']} (node's count)")
    models = ", ".join(f"{m.get('model_id')} ({m.get('status')})" for m in n["models"]) or "none"
    labels = ", ".join(f"{k}={v}" for k, v in n["labels"].items()) or "none"
    print(f"Models:        {models}")
    print(f"Labels:        {labels}")
    print(f"Public jobs:   {'accepted' if n['accept_public_jobs'] else 'not accepted'}")
    print(f"Jobs:          {len(n['assigned_jobs'])}/{n['max_concurrent_jobs']} "
          f"{' '.join(n['assigned_jobs'])}".rstrip())
    print(f"Health:        window {health['window'] or '(empty)'}, {health['consecutive_ok']} ok / "
          f"{health['consecutive_fail']} failed in a row, last: {health['last_reason']}")
    print(f"Job outcomes:  {_job_health(n.get('job_health'))}")
    mismatch = n.get("running_jobs_mismatch")
    if mismatch:
        print(f"Running jobs:  MISMATCH: the node reports {mismatch['running_jobs']}, "
              f"{mismatch['assigned_jobs']} assigned, for {mismatch['heartbeats']} heartbeats "
              f"(for {duration(_since_s(mismatch['since_ms']))})")
    drain = n.get("drain")
    if drain:
        state = "in progress" if drain["in_progress"] else (drain["outcome"] or "over")
        deadline = f", deadline in {duration(_until_s(drain['deadline_ms']))}" \
            if drain["deadline_ms"] and drain["in_progress"] else ""
        print(f"Drain:         {state}: asked by {drain['requested_by']}: {drain['reason']}; "
              f"{drain['jobs_left']} of {plural(drain['jobs_at_start'], 'job')} left{deadline}")
    print("Transitions:")
    for t in n["transitions"][:10]:
        when = ago(_since_s(t.get("at_ms")))
        print(f"  {when:>10}  {t.get('from') or '(new)'} -> {t.get('to')}: {t.get('reason')}")
    query = f"?job={job_id}" if job_id else ""
    why = api.call("GET", f"/api/nodes/{node_id}/eligibility{query}")
    print(f"Why not {'job ' + job_id if job_id else 'a job without requirements'}: "
          f"{'eligible' if why['eligible'] else 'not eligible (' + why['first_failure'] + ')'}")
    for step in why["steps"]:
        print(f"  {'ok  ' if step['passed'] else 'FAIL'} {step['step']:<14} {step['detail']}")


def _job_health(job_health: dict[str, Any] | None) -> str:
    """The node's job window in one line: "window 1100 (2 node failures of 4), 2 in a row; last failure ..."."""
    job_health = job_health or {}
    window = job_health.get("window") or ""
    text = (f"window {window} ({job_health['window_failures']} node failures of {len(window)}), "
            f"{job_health['consecutive_failures']} in a row") if window else "window (empty)"
    last = job_health.get("last_failure")
    if last:
        text += f"; last failure {last.get('code')} (job {last.get('job_id')})"
    if job_health.get("cooldown_until_ms"):
        text += f"; JobFailures cool-down, {duration(_until_s(job_health['cooldown_until_ms']))} left"
    return text


def drain(api: Api, node_id: str, deadline_s: float | None, reason: str) -> None:
    body: dict[str, Any] = {"reason": reason, "requested_by": os.environ.get("USER", "dispatcher CLI")}
    if deadline_s is not None:
        body["deadline_seconds"] = deadline_s
    answer = api.call("POST", f"/api/nodes/{node_id}/drain", body)
    left = f"; {plural(answer['jobs_left'], 'job')} left to finish" if answer["status"] == NodeStatus.DRAINING else ""
    print(f"node {node_id} is {answer['status']}{left}")


def undrain(api: Api, node_id: str) -> None:
    answer = api.call("DELETE", f"/api/nodes/{node_id}/drain")
    print(answer.get("message") or f"node {node_id} is {answer['status']}")


def cordon(api: Api, node_id: str, reason: str) -> None:
    answer = api.call("POST", f"/api/nodes/{node_id}/cordon",
                      {"reason": reason, "requested_by": os.environ.get("USER", "dispatcher CLI")})
    print(f"node {node_id} is cordoned: no new jobs; it stays {answer['status']} and finishes what it has")


def uncordon(api: Api, node_id: str) -> None:
    answer = api.call("DELETE", f"/api/nodes/{node_id}/cordon")
    status = answer["status"]
    then = "takes new jobs again" if status == NodeStatus.READY else f"takes new jobs once ready (now {status})"
    print(f"node {node_id} is uncordoned: it {then}")


def forget(api: Api, node_id: str) -> None:
    api.call("DELETE", f"/api/nodes/{node_id}")
    print(f"node {node_id} is forgotten: its record and secret are gone")


# --- submit ----------------------------------------------------------------------------


def submit(api: Api, args: argparse.Namespace) -> int:
    from celery import Celery

    from dispatcher.settings import load_settings

    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        raise CliError(f"--payload is not JSON: {exc}", EXIT_USAGE) from exc
    selector = {}
    for pair in args.selector:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CliError(f"--selector {pair!r} must look like key=value", EXIT_USAGE)
        selector[key] = value
    kwargs = {"job_type": args.type, "payload": payload, "required_models": args.model, "require_gpu": args.gpu,
              "public": args.public, "timeout_seconds": args.timeout, "max_attempts": args.max_attempts,
              "dispatch_timeout_seconds": args.dispatch_timeout, "priority": args.priority, "node_selector": selector,
              "fail_fast": args.fail_fast}
    redis_url = load_settings().redis_url
    same_redis(api, redis_url)
    client = Celery(broker=redis_url, backend=redis_url)
    result = client.send_task("dispatcher.submit_job", kwargs=kwargs)
    print(f"job {result.id} submitted", file=sys.stderr)
    if args.no_wait:
        print(result.id)
        return 0
    return follow(api, result)


def same_redis(api: Api, redis_url: str) -> None:
    """Refuse to submit into another Redis than the dispatcher's (the job would wait for ever)."""
    import redis

    try:
        info = api.call("GET", "/api/info")
    except CliError:
        return  # the dispatcher cannot be asked; submitting through Celery may still work
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=3)
    try:
        ours = (client.info("server").get("run_id"), client.connection_pool.connection_kwargs.get("db", 0))
    except redis.RedisError as exc:
        raise CliError(f"cannot reach Redis at REDIS_URL ({exc})", EXIT_UNREACHABLE) from exc
    theirs = (info.get("redis_run_id"), info.get("redis_db", 0))
    if theirs[0] and ours != theirs:
        raise CliError(f"REDIS_URL is not the Redis the dispatcher at {api.url} uses: set REDIS_URL to the "
                       "dispatcher's (dispatcher up prints it)", EXIT_USAGE)


def follow(api: Api, result: Any) -> int:
    """Show the job's progress until it ends, and why it waits with the time left (its
    WAITING state says so); print its output."""
    from celery.states import READY_STATES

    from dispatcher.filter import summarize

    tty = sys.stderr.isatty()
    shown = ""
    while not result.ready():
        # Each read asks the backend again, and the job may end between two: the info is read
        # once, then the state, which is final if the info was (the exception of a failure).
        info = result.info
        state = result.state
        if state in READY_STATES:
            break
        if not isinstance(info, dict):
            info = {}
        left = ""
        if state == CeleryState.STARTED:
            progress = info.get("progress")
            bar = f" {progress * 100:3.0f}%" if progress is not None else ""
            line = f"running on {info.get('node_id')} (attempt {info.get('attempt')}){bar} {info.get('message') or ''}"
        elif state == CeleryState.WAITING:
            line = "waiting for a node: " + summarize(info.get("eligible", 0), info.get("total", 0),
                                                      info.get("exclusions", {}), info.get("examples", {}))
            if info.get("deadline_ms"):
                left_s = max(0, info["deadline_ms"] - time.time() * 1000) / 1000
                left = f" [{left_s:.0f} s left]"
        else:
            line = "submitted, not yet taken by a worker"
        # A terminal shows the countdown in place; a log gets a line when the reason changes.
        if line != shown or tty:
            print(("\r\033[K" if tty else "") + line + (left if tty else ""), end="" if tty else "\n",
                  file=sys.stderr, flush=True)
            shown = line
        time.sleep(0.2 if not tty else 0.5)
    if tty:
        print(file=sys.stderr)
    if result.successful():
        print(json.dumps(result.result, indent=2))
        return 0
    print(f"dispatcher: job {result.id} {result.state.lower()}: {type(result.result).__name__}: {result.result}",
          file=sys.stderr)
    return EXIT_FAILED


# --- the command line ------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dispatcher", description="Operate the GPU fleet dispatcher.")
    local_url = f"http://127.0.0.1:{os.environ.get('PORT', '8000')}"
    p.add_argument("--url", default=os.environ.get("DISPATCHER_URL", local_url),
                   help="the web process (env DISPATCHER_URL)")
    p.add_argument("--token", default=os.environ.get("DISPATCHER_ADMIN_TOKEN"),
                   help="the admin token, for drain, cordon, forget and their undoing (env DISPATCHER_ADMIN_TOKEN)")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = commands.add_parser("up", help="run the whole system locally (private Redis, Procfile processes, demo nodes)")
    up.add_argument("--nodes", type=int, default=2, help="demo node agents to start (default 2)")
    nodes = commands.add_parser("nodes", help="list the nodes (like kubectl get nodes)")
    nodes.add_argument("--status", choices=tuple(NodeStatus))
    jobs = commands.add_parser("jobs", help="list the jobs, newest first")
    jobs.add_argument("--state", choices=LIST_STATES)
    jobs.add_argument("--node", help="only the jobs of this node (running, or ended there)")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (default 50, up to 500)")
    node = commands.add_parser("node", help="describe one node: history, drain, and why it would not take a job")
    node.add_argument("node_id")
    node.add_argument("--job", help="explain the filter for this job instead of a job without requirements")
    d = commands.add_parser("drain", help="stop new jobs to a node; it goes offline once its jobs end")
    d.add_argument("node_id")
    d.add_argument("--deadline", type=float, metavar="SECONDS", help="then send what is left elsewhere")
    d.add_argument("--reason", default="drained from the CLI")
    u = commands.add_parser("undrain", help="end a drain")
    u.add_argument("node_id")
    c = commands.add_parser("cordon", help="stop new jobs to a node without draining it: it keeps its status")
    c.add_argument("node_id")
    c.add_argument("--reason", default="cordoned from the CLI")
    commands.add_parser("uncordon", help="end a cordon").add_argument("node_id")
    commands.add_parser("forget", help="delete an offline node, its secret and its history").add_argument("node_id")
    s = commands.add_parser("submit", help="submit a job, follow it, print its output")
    s.add_argument("--type", required=True, help="job_type")
    s.add_argument("--payload", default="{}", help="JSON object")
    s.add_argument("--model", action="append", default=[], help="a required model (repeatable)")
    s.add_argument("--gpu", action="store_true", help="require a GPU")
    s.add_argument("--public", action="store_true", help="a public job")
    s.add_argument("--selector", action="append", default=[], metavar="KEY=VALUE", help="a label the node must carry")
    s.add_argument("--priority", type=int, default=5)
    s.add_argument("--timeout", type=float, default=300, help="timeout_seconds of one attempt")
    s.add_argument("--dispatch-timeout", type=float, default=300, help="how long to wait for a node")
    s.add_argument("--max-attempts", type=int, default=3)
    s.add_argument("--fail-fast", action="store_true",
                   help="fail at once when no registered node could ever take the job (instead of waiting)")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return")
    commands.add_parser("agent", help="run the node agent (see `dispatcher agent --help`)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command_line = parser()
    args, rest = command_line.parse_known_args(argv)
    if args.command == "agent":
        from dispatcher.agent.__main__ import main as agent_main

        return agent_main(rest)
    if rest:
        command_line.error(f"unrecognized arguments: {' '.join(rest)}")
    api = Api(args.url, args.token)
    try:
        if args.command == "up":
            from dispatcher.localrun.run import run_local

            return run_local(project_root(), demo_nodes=args.nodes)
        if args.command == "nodes":
            show_nodes(api, args.status)
        elif args.command == "node":
            show_node(api, args.node_id, args.job)
        elif args.command == "drain":
            drain(api, args.node_id, args.deadline, args.reason)
        elif args.command == "undrain":
            undrain(api, args.node_id)
        elif args.command == "jobs":
            show_jobs(api, args.state, args.node, args.limit)
        elif args.command == "cordon":
            cordon(api, args.node_id, args.reason)
        elif args.command == "uncordon":
            uncordon(api, args.node_id)
        elif args.command == "forget":
            forget(api, args.node_id)
        elif args.command == "submit":
            return submit(api, args)
    except CliError as exc:
        return fail(str(exc), exc.code)
    except DispatcherError as exc:
        return fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        return 130
    return 0


def fail(message: str, code: int) -> int:
    print(f"dispatcher: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
