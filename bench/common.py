"""Shared pieces of the benchmarks: processes, percentiles."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dispatcher.localrun.redis_server import LocalRedis, free_port  # noqa: E402

T = TypeVar("T")


def env_for(redis_url: str, port: int, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update({"REDIS_URL": redis_url, "PORT": str(port), "PYTHONUNBUFFERED": "1"})
    if os.environ.get("BENCH_GEVENT_MONITOR"):
        # gevent reports any greenlet that blocks the loop longer than this, with its stack.
        env.update({"GEVENT_MONITOR_THREAD_ENABLE": "true",
                    "GEVENT_MAX_BLOCKING_TIME": os.environ["BENCH_GEVENT_MONITOR"]})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({f"DISPATCHER_{k.upper()}": v for k, v in settings.items()})
    return env


def celery_env(redis_url: str, **settings: str) -> dict[str, str]:
    """A worker's or beat's environment: they listen on no port, so PORT is left unset."""
    env = env_for(redis_url, 1, **settings)
    del env["PORT"]
    return env


def procfile_command(kind: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() == kind:
            return command.strip()
    raise SystemExit(f"no {kind!r} process in the Procfile")


def start(args: list[str], env: dict[str, str], log: Path, append: bool = False) -> subprocess.Popen[bytes]:
    """Start a process in its own session (a process group that killpg reaches whole), its
    output to ``log``: appended to with ``append``, so that one log spans its restarts."""
    with log.open("ab" if append else "wb") as out:
        return subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def killpg(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the process group ``start`` made (its id is the leader's pid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(pid, sig)


def raise_open_files_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (thousands of sockets need it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def answers_http(url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> bool:
    """Whether ``url`` answers within ``timeout_s``; False as soon as ``process``, the one
    behind it, has died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def wait_http(url: str, timeout_s: float = 20) -> None:
    if not answers_http(url, timeout_s):
        raise SystemExit(f"{url} did not answer")


def chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values_ms: list[float]) -> str:
    return f"p50 {statistics.median(values_ms):7.2f} ms  p99 {pct(values_ms, 0.99):7.2f} ms  (n={len(values_ms)})"


__all__ = ["ROOT", "LocalRedis", "answers_http", "celery_env", "chunks", "env_for", "free_port", "killpg", "pct",
           "procfile_command", "raise_open_files_limit", "start", "summary", "wait_http"]
