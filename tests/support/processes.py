"""Real processes, started as the Procfile and a person start them: their environment,
their logs, a web server, the dispatcher command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from dispatcher.localrun.redis_server import free_port
from tests.support.waiting import wait_for

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parents[2]


def clean_env(redis_url: str, **overrides: Any) -> dict[str, str]:
    """The parent's environment without any DISPATCHER_* setting, plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_") and k not in ("REDIS_URL", "PORT")}
    env["REDIS_URL"] = redis_url
    env["PYTHONUNBUFFERED"] = "1"
    # The Procfile's commands (gunicorn, celery) live beside this interpreter.
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)  # fault hooks live in tests/faults
    for key, value in overrides.items():
        name = key if key.isupper() else f"DISPATCHER_{key.upper()}"
        env[name] = json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)
    return env


class Process:
    """A child process whose output goes to a log file, shown when a test fails."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, cwd: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout_s: float = 10) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait()
        self._log.close()

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        self.signal(signal.SIGKILL)
        self.popen.wait()
        self._log.close()


def log_events(process: Process, event: str, **fields: Any) -> list[dict[str, Any]]:
    """The JSON log lines of a process (the dispatcher's processes and agents log one object a
    line) with this ``event`` and these field values, oldest first."""
    found = []
    for line in process.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event and \
                all(record.get(k) == v for k, v in fields.items()):
            found.append(record)
    return found


def procfile_command(name: str) -> str:
    """The Procfile's command line for a process type, run through a shell as honcho does."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        kind, sep, command = line.partition(":")
        if sep and kind.strip() == name:
            return command.strip()
    raise KeyError(f"no {name!r} process in the Procfile")


def start_procfile(name: str, env: dict[str, str], log_dir: Path, celery_app: str | None = None) -> Process:
    """A Procfile process; ``celery_app`` swaps the app a celery command loads (for fault hooks)."""
    command = procfile_command(name)
    if celery_app is not None:
        command = command.replace("-A dispatcher.celery_app", f"-A {celery_app}")
    return Process(name, ["bash", "-c", f"exec {command}"], env, log_dir, cwd=log_dir)


class WebServer:
    """``gunicorn -c python:web.gunicorn_conf`` exactly as the Procfile runs it."""

    def __init__(self, redis_url: str, log_dir: Path, config: str = "python:web.gunicorn_conf",
                 **settings: Any) -> None:
        self.port = free_port()
        self.env = clean_env(redis_url, PORT=self.port, **settings)
        self.log_dir = log_dir
        self.config = config
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/node"

    def start(self, config: str | None = None) -> WebServer:
        """Start (or start again, on the same port); ``config`` replaces the gunicorn config."""
        self.config = config or self.config
        if self.process is not None:
            self.process.kill()  # reap a dead one (or stop a live one) before taking its port
        self.process = Process("web", [PYTHON, "-m", "gunicorn", "-c", self.config],
                               self.env, self.log_dir, cwd=self.log_dir)
        try:
            wait_for(self._healthy, 20, 0.05, what=f"web server on port {self.port}")
        except AssertionError:
            self.process.kill()
            raise
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if not self.process.alive():
            raise AssertionError(f"web server exited:\n{self.process.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        return self.request("GET", path, headers=headers)

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                raw = response.read()
                status = response.status
                ctype = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            raw, status, ctype = err.read(), err.code, err.headers.get("Content-Type", "")
        return status, (json.loads(raw) if "json" in ctype else raw.decode())

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()


def web_worker_rss(server: WebServer) -> int:
    """Resident bytes of the web server's worker processes (gunicorn's children)."""
    import psutil

    assert server.process is not None
    return sum(child.memory_info().rss for child in psutil.Process(server.process.popen.pid).children(recursive=True))




def run_cli(system: Any, *args: str, timeout_s: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    """``dispatcher <args>`` against a running system (its web process and its Redis), to its end."""
    return subprocess.run([PYTHON, "-m", "dispatcher.cli", *args], env=cli_env(system, **env), capture_output=True,
                          text=True, timeout=timeout_s)


def cli_env(system: Any, **env: str) -> dict[str, str]:
    return clean_env(system.redis_url, DISPATCHER_URL=system.web.url, **env)
