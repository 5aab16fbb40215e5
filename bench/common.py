"""Shared pieces of the benchmarks: processes, percentiles."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dispatcher.localredis import LocalRedis, free_port  # noqa: E402


def env_for(redis_url: str, port: int, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update({"REDIS_URL": redis_url, "PORT": str(port), "PYTHONUNBUFFERED": "1"})
    if os.environ.get("BENCH_GEVENT_MONITOR"):
        # gevent reports any greenlet that blocks the loop longer than this, with its stack.
        env.update({"GEVENT_MONITOR_THREAD_ENABLE": "true", "GEVENT_MAX_BLOCKING_TIME": os.environ["BENCH_GEVENT_MONITOR"]})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({f"DISPATCHER_{k.upper()}": v for k, v in settings.items()})
    return env


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_http(url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values_ms: list[float]) -> str:
    return f"p50 {statistics.median(values_ms):7.2f} ms  p99 {pct(values_ms, 0.99):7.2f} ms  (n={len(values_ms)})"


__all__ = ["ROOT", "LocalRedis", "free_port", "env_for", "start", "wait_http", "pct", "summary"]
