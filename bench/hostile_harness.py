"""The harness of bench/hostile.py: the system, the honest side and the probes, started and
stopped together, and one case run against them (the attacker a child process of its own)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from common import start
from hostile_honest import HonestClient, HonestNode, RegistrationProbes
from hostile_probes import HttpProber, WebWatch, now_s
from hostile_report import (
    HONEST_P99_LIMIT_MS,
    Window,
    failed_checks,
    fmt_ms,
    log_size,
    summarize_case,
    web_log_events,
)
from hostile_system import GROUPS, System

T = TypeVar("T")

#: The attacker child is this bench's entry point run with --attack.
ENTRY_POINT = Path(__file__).resolve().with_name("hostile.py")


@dataclass
class CaseSpec:
    name: str
    describe: str
    attack: list[str] | None  # arguments of the attacker child, None for no attack


class Harness:
    def __init__(self, args: argparse.Namespace, log_dir: Path, extra_settings: dict[str, str]) -> None:
        self.args = args
        self.system = System(log_dir, extra_settings)
        # The honest side and the probes exist from start() on: see the properties below.
        self._node: HonestNode | None = None
        self._client: HonestClient | None = None
        #: With the honest client in a lane of its own: a second one on the shared queue,
        #: measured but not checked (it waits behind whatever floods that queue).
        self.shared_client: HonestClient | None = None
        self._healthz: HttpProber | None = None
        self._nodes_api: HttpProber | None = None
        self._watch: WebWatch | None = None
        self.started_rss_mb = 0.0

    def start(self) -> None:
        self.system.start()
        self._watch = WebWatch(self.system, self.args.rss_cap_mb, self.args.min_available_mb)
        self._watch.start()
        self._node = HonestNode(self.system.ws_url)
        self._node.start()
        if not self._node.ready.wait(60):
            raise RuntimeError("the honest node did not become ready")
        self._client = HonestClient(self.system.redis_url, queue=self.args.honest_queue)
        self._client.start()
        if self.args.honest_queue:
            self.shared_client = HonestClient(self.system.redis_url)
            self.shared_client.start()
        self._wait_warm()
        self._healthz = HttpProber(f"{self.system.http_url}/healthz", 0.25, self.args.healthz_timeout_seconds)
        self._nodes_api = HttpProber(f"{self.system.http_url}/api/nodes", 2.0, 30.0)
        self._healthz.start()
        self._nodes_api.start()
        time.sleep(0.5)
        self.started_rss_mb = self._watch.latest().get("rss_mb") or 0.0

    @property
    def node(self) -> HonestNode:
        return _started(self._node)

    @property
    def client(self) -> HonestClient:
        return _started(self._client)

    @property
    def clients(self) -> list[HonestClient]:
        """The honest client, and the one on the shared queue when there is one."""
        return [self.client, *([self.shared_client] if self.shared_client is not None else [])]

    @property
    def healthz(self) -> HttpProber:
        return _started(self._healthz)

    @property
    def nodes_api(self) -> HttpProber:
        return _started(self._nodes_api)

    @property
    def watch(self) -> WebWatch:
        return _started(self._watch)

    def _wait_warm(self) -> None:
        """Until three honest jobs went through: worker pools and connections are warm."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sum(1 for r in self.client.between(0, now_s()) if r.done and r.error is None) >= 3:
                return
            time.sleep(0.2)
        raise RuntimeError("no honest job went through within 60 s")

    def stop(self) -> None:
        for part in (self._healthz, self._nodes_api, self._client, self.shared_client, self._node, self._watch):
            if part is not None:
                with contextlib.suppress(Exception):  # cleanup goes on whatever one part says
                    part.stop()
        # Celery results of failed jobs sit in reference cycles; their finalizers unsubscribe
        # from Redis, so they must run while Redis is still up.
        gc.collect()
        self.system.stop()

    def trim_before(self, t_s: float) -> None:
        """Drop what earlier cases recorded: the bench's memory stays bounded."""
        for samples in (self.healthz.samples, self.nodes_api.samples, self.watch.samples, self.node.events,
                        self.node.loop_lag):
            samples.trim_before(t_s)
        for client in self.clients:
            client.trim_before(t_s)

    def unhealthy_reason(self, result: dict[str, Any]) -> str | None:
        """Why the system should be restarted before the next case (None: it recovered)."""
        if result["ended_by"].startswith("stopped"):
            return "the case was stopped at the memory cap"
        latest = self.watch.latest()
        if latest.get("pid") is None:
            return "web worker gone"
        grown_mb = latest["rss_mb"] - self.started_rss_mb
        if grown_mb > self.args.rss_growth_limit_mb:
            return f"web worker RSS {latest['rss_mb']:.0f} MiB, {grown_mb:.0f} MiB more than at its start"
        recent = self.healthz.samples.latest(3)
        if recent and all(error for _, _, error in recent):
            return "/healthz failing"
        backlog = self.system.celery_backlog()
        if backlog > 50:
            return f"{backlog} tasks still queued for the Celery worker"
        last_jobs = [r for r in self.client.between(0, now_s()) if r.done][-3:]
        if any(r.error or (r.latency_ms or 0) >= HONEST_P99_LIMIT_MS for r in last_jobs):
            return "the last honest jobs of the recovery still failed or were slow"
        if self.node.status != "ready":
            deadline = time.monotonic() + 15  # a resumed node needs three heartbeats to be ready again
            while time.monotonic() < deadline and self.node.status != "ready":
                time.sleep(0.2)
            if self.node.status != "ready":
                return f"honest node {self.node.status or 'disconnected'}"
        return None


# --- the attacker child -------------------------------------------------------------------


def attack_log(spec: CaseSpec, log_dir: Path) -> Path:
    return log_dir / f"attack-{spec.name}.log"


def start_attacker(spec: CaseSpec, log_dir: Path) -> subprocess.Popen[bytes]:
    assert spec.attack is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["PYTHONUNBUFFERED"] = "1"
    args = [sys.executable, str(ENTRY_POINT), "--attack", *spec.attack]
    return GROUPS.add(start(args, env, attack_log(spec, log_dir)))


def last_json_line(path: Path) -> dict[str, Any]:
    """The attacker's latest status line (only the file's tail is read)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


# --- one case ---------------------------------------------------------------------------------


def run_case(h: Harness, spec: CaseSpec, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    h.watch.cap_hit.clear()
    quiet_s = now_s()
    time.sleep(args.quiet_seconds)
    attack_s = now_s()
    web_log = h.system.log_dir / "web.log"
    web_log_offset = log_size(web_log)
    attacker = start_attacker(spec, log_dir) if spec.attack else None
    probes = RegistrationProbes(h.system.ws_url, args.probe_every_seconds, 15.0)
    probes.start()
    ended_by = hold_attack(h, attacker, args.case_seconds, spec, log_dir)
    probes.stop()
    end_s = now_s()
    attacker_status: dict[str, Any] = {}
    if attacker is not None:
        # SIGTERM: the attacker prints its final figures and exits; SIGKILL if it does not.
        GROUPS.stop(attacker, grace_s=15.0)
        attacker_status = last_json_line(attack_log(spec, log_dir))
    time.sleep(args.recovery_seconds)
    recovered_s = now_s()
    # Jobs submitted during the attack count for it, however late their answer; those
    # of the recovery tell whether it recovered.
    for client in h.clients:
        client.wait_settled(recovered_s, client.timeout_s + 10)
    time.sleep(0.5)  # a probe started near the end records its answer
    window = Window(quiet_s, attack_s, end_s, recovered_s)
    result = summarize_case(h, spec, window, probes, attacker_status, ended_by)
    result["web_log"] = web_log_events(web_log, web_log_offset)
    result["checks_failed"] = failed_checks(result, args)
    return result


def hold_attack(h: Harness, attacker: subprocess.Popen[bytes] | None, seconds: float, spec: CaseSpec,
                log_dir: Path) -> str:
    """Wait out the case; stop early at the memory cap or when the attacker dies. Says why it ended."""
    started = time.monotonic()
    next_progress = started + 5
    while True:
        elapsed = time.monotonic() - started
        if elapsed >= seconds:
            return "time"
        if h.watch.cap_hit.wait(0.25):
            return f"stopped after {elapsed:.1f} s: {h.watch.cap_reason}"
        if attacker is not None and attacker.poll() is not None:
            return f"attacker exited ({attacker.returncode}) after {elapsed:.1f} s"
        if time.monotonic() >= next_progress:
            next_progress += 5
            print_progress(h, spec, elapsed, log_dir)


def print_progress(h: Harness, spec: CaseSpec, elapsed_s: float, log_dir: Path) -> None:
    """One line to stderr every 5 s, to watch a run as it goes."""
    latest = h.watch.latest()
    healthz = "-"
    for latency_ms, _, error in h.healthz.samples.latest(1):
        healthz = "FAIL" if error else f"{fmt_ms(latency_ms)} ms"
    done = [r for r in h.client.between(now_s() - 5, now_s()) if r.done]
    attack = last_json_line(attack_log(spec, log_dir)) if spec.attack else {}
    print(f"  [{spec.name} +{elapsed_s:4.0f} s] web RSS {latest.get('rss_mb') or 0:.0f} MiB, /healthz {healthz}, "
          f"honest jobs done (last 5 s) {len(done)}, attacker {json.dumps(attack)[:200]}",
          file=sys.stderr, flush=True)


def _started(part: T | None) -> T:
    if part is None:
        raise RuntimeError("the harness is not started")
    return part
