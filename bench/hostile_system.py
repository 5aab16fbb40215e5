"""The system bench/hostile.py attacks: redis-server and the Procfile's web, worker and beat.

Every child leads its own process group and is killed as a group, so that a
Celery pool child or a gunicorn worker never outlives the bench.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
from pathlib import Path

import psutil
import redis

from common import (
    LocalRedis,
    answers_http,
    celery_env,
    env_for,
    free_port,
    killpg,
    procfile_command,
    start,
)

#: The only registration token the system accepts: the honest side has it, the attackers do not.
HONEST_TOKEN = "honest-token"


class ProcessGroups:
    """Every process this bench starts, so that all of them end with it (Ctrl-C and failures too)."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()

    def add(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        with self._lock:
            self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
        """SIGTERM to the group, SIGKILL to whatever is left of it after ``grace_s``."""
        if proc.poll() is None:
            killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace_s)
        # Also after the leader is gone: its children (Celery's pool) may outlive it.
        killpg(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        with self._lock:
            if proc in self._procs:
                self._procs.remove(proc)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(reversed(self._procs))
        for proc in procs:
            self.stop(proc, grace_s=5.0)


GROUPS = ProcessGroups()


class System:
    """redis-server, web (one gunicorn worker), worker (concurrency 2) and beat: the Procfile's commands."""

    def __init__(self, log_dir: Path, extra_settings: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.settings = {
            "registration_tokens": json.dumps([HONEST_TOKEN]),
            "require_gpu": "false",
            "resource_threshold_percent": "100",
            "heartbeat_interval_seconds": "1",
            "heartbeat_timeout_seconds": "5",
            # The scan finds silent nodes and expires waiting jobs: often enough for a 5 s timeout.
            "periodic_scan_interval_seconds": "2",
            **extra_settings,
        }
        self.port = 0
        self.store: LocalRedis | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/node"

    @property
    def redis_url(self) -> str:
        assert self.store is not None
        return self.store.url

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._start_redis()
        env = celery_env(self.redis_url, **self.settings)
        # The beat keeps its schedule file in the log folder (the Procfile names it after $TMPDIR).
        envs = {"worker": {**env, "WORKER_CONCURRENCY": "2"}, "beat": {**env, "TMPDIR": str(self.log_dir)}}
        for name, proc_env in envs.items():
            self.procs[name] = GROUPS.add(self._start_procfile(name, proc_env))
        self._start_web()

    def _start_procfile(self, kind: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        return start(["bash", "-c", f"exec {procfile_command(kind)}"], env, self.log_dir / f"{kind}.log")

    def _start_redis(self) -> None:
        # free_port() only finds a port free now: on a shared machine another process may take
        # it before our server binds it, so a failed start is tried again on another port.
        for attempt in range(3):
            store = LocalRedis(self.log_dir / "redis", append_only=False)
            try:
                self.store = store.start()
                break
            except Exception:
                if store.process is not None:
                    GROUPS.stop(store.process)
                if attempt == 2:
                    raise
        assert self.store is not None and self.store.process is not None
        GROUPS.add(self.store.process)

    def _start_web(self) -> None:
        for _ in range(3):  # as for Redis: the port may be taken before gunicorn binds it
            self.port = free_port()
            env = env_for(self.redis_url, self.port, **self.settings)
            env["WEB_CONCURRENCY"] = "1"
            web = GROUPS.add(self._start_procfile("web", env))
            self.procs["web"] = web
            if answers_http(f"{self.http_url}/readyz", 30, web):
                return
            GROUPS.stop(web)
        raise RuntimeError(f"the web process did not start (see {self.log_dir / 'web.log'})")

    def web_worker(self) -> psutil.Process | None:
        """The gunicorn worker (the master's only child), where sessions live."""
        try:
            children = psutil.Process(self.procs["web"].pid).children()
        except (psutil.NoSuchProcess, KeyError):
            return None
        return children[0] if children else None

    def redis_process(self) -> psutil.Process | None:
        try:
            return psutil.Process(self.store.process.pid) if self.store and self.store.process else None
        except psutil.NoSuchProcess:
            return None

    def celery_backlog(self) -> int:
        """Tasks waiting in the Celery worker's queue (kombu keeps it in the Redis list "celery")."""
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        try:
            return int(client.llen("celery"))
        except redis.RedisError:
            return -1
        finally:
            client.close()

    def stop(self) -> None:
        for name in ("beat", "worker", "web"):
            if name in self.procs:
                GROUPS.stop(self.procs.pop(name))
        if self.store is not None and self.store.process is not None:
            GROUPS.stop(self.store.process)
