"""Deployable on a Heroku-like platform as is: `honcho start` runs the Procfile
with REDIS_URL a rediss:// (TLS) URL, and a job goes through."""

from __future__ import annotations

import json
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme

from dispatcher.keys import Keys
from dispatcher.localrun.redis_server import free_port, redis_server_binary
from tests.support import PYTHON, ROOT, Process, clean_env, client_app, start_procfile, wait_for, wait_for_scans

FAST = {"require_gpu": False, "resource_threshold_percent": 100, "heartbeat_interval_seconds": 0.3,
        "heartbeat_timeout_seconds": 3, "periodic_scan_interval_seconds": 0.5}


def start_tls_redis(tmp_path: Path, logs_dir: Path) -> tuple[Process, int]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = free_port()
    server = Process("redis-tls", [redis_server_binary(), "--port", "0", "--tls-port", str(port),
                                   "--tls-cert-file", str(tmp_path / "server.pem"),
                                   "--tls-key-file", str(tmp_path / "server.pem"),
                                   "--tls-ca-cert-file", str(tmp_path / "ca.pem"), "--tls-auth-clients", "no",
                                   "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                     {}, logs_dir, cwd=tmp_path)
    probe = redis.Redis.from_url(f"rediss://127.0.0.1:{port}/0", ssl_cert_reqs="none", socket_connect_timeout=1)

    def up() -> bool:
        try:
            return bool(probe.ping())
        except redis.ConnectionError:
            return False
    wait_for(up, 10, 0.1, what="TLS redis-server")
    return server, port


def test_honcho_runs_the_procfile_on_a_tls_redis(tmp_path: Path, logs_dir: Path, agents: Any) -> None:
    tls_redis, port = start_tls_redis(tmp_path, logs_dir)
    url = f"rediss://127.0.0.1:{port}/0"  # as Heroku gives it: no ssl_cert_reqs parameter
    web_port, flower_port = free_port(), free_port()
    env = clean_env(url, PORT=web_port, FLOWER_PORT=flower_port, FLOWER_UNAUTHENTICATED_API="true", **FAST)
    honcho = Process("honcho", [str(Path(PYTHON).parent / "honcho"), "start", "-f", str(ROOT / "Procfile"),
                                "-d", str(ROOT)], env, logs_dir, cwd=ROOT)
    try:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/readyz", timeout=1) as response:
                    return json.loads(response.read())["status"] == "ok"
            except OSError:
                return False
        wait_for(ready, 30, 0.2, what=f"web on $PORT={web_port} reaching Redis over TLS")
        agents(f"ws://127.0.0.1:{web_port}/ws/node", tmp_path / "agent.json")
        client = client_app(f"{url}?ssl_cert_reqs=none")
        result = client.send_task("dispatcher.submit_job", kwargs={"job_type": "echo", "payload": {"over": "tls"}})
        assert result.get(timeout=60) == {"over": "tls"}
        log = honcho.log()
        for process in ("web", "worker", "beat", "flower"):
            assert f"{process}.1 started" in log, f"honcho started the Procfile's {process}"

        def flower_state() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{flower_port}/api/task/info/{result.id}",
                                            timeout=5) as rsp:
                    return json.loads(rsp.read())["state"]
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None  # its events not there yet: they go out in batches, 0.25 s apart
                raise
        wait_for(lambda: flower_state() == "SUCCESS", 10, 0.2, what="flower following the events over TLS")
    finally:
        honcho.stop()
        tls_redis.stop()


#: Redis client connections web + worker + beat may hold together: the smallest managed
#: Redis plans cap clients at 20 (docs/operations.md, the connection budget).
CONNECTION_BUDGET = 20


def redis_clients(server: Any, processes: dict[str, Process]) -> dict[str, int]:
    """The private redis-server's client connections, by the process type holding each (a
    worker's pool processes count as the worker's); "other" for the test's own."""
    import collections

    import psutil

    holder: dict[int, str] = {}
    for name, process in processes.items():
        root = psutil.Process(process.popen.pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                for conn in proc.net_connections(kind="tcp"):
                    if conn.raddr and conn.raddr.port == server.port:
                        holder[conn.laddr.port] = name
            except psutil.Error:
                continue
    probe = redis.Redis(port=server.port)
    try:
        ports = [int(c["addr"].rsplit(":", 1)[1]) for c in probe.client_list()]
    finally:
        probe.close()
    return dict(collections.Counter(holder.get(port, "other") for port in ports))


@pytest.mark.slow
def test_web_worker_and_beat_stay_within_a_small_redis_plans_connections(tmp_path: Path, logs_dir: Path,
                                                                         agents: Any) -> None:
    from dispatcher.localrun.redis_server import LocalRedis

    server = LocalRedis(tmp_path / "redis", append_only=False).start()
    env = clean_env(server.url, **FAST)  # the Procfile's commands with the default pool sizes
    web_port = free_port()
    processes = {"web": start_procfile("web", {**env, "PORT": str(web_port)}, logs_dir),
                 "worker": start_procfile("worker", env, logs_dir),
                 "beat": start_procfile("beat", env, logs_dir)}
    try:
        wait_for(lambda: "ready." in processes["worker"].log(), 40, 0.2, what="worker ready")
        for i in range(2):
            agents(f"ws://127.0.0.1:{web_port}/ws/node", tmp_path / f"agent-{i}.json", "--model", "m",
                   "--max-concurrent-jobs", "2")
        # Idle: both nodes ready and heartbeating, and the beat's scans run by the worker.
        watch = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            wait_for(lambda: watch.scard(Keys().status_set("ready")) == 2, 20, 0.1, what="both nodes ready")
            wait_for_scans(watch, Keys(), int(time.time() * 1000), count=2)
        finally:
            watch.close()
        idle = redis_clients(server, processes)
        client = client_app(server.url)
        # More jobs than the 4 slots: some wait, and freed slots kick passes over them.
        results = [client.send_task("dispatcher.submit_job", kwargs={
            "job_type": "sleep", "payload": {"seconds": 0.2}, "required_models": ["m"]}) for _ in range(12)]
        for result in results:
            result.get(timeout=60)
        busy = redis_clients(server, processes)
        print(f"Redis connections, idle: {idle}; after 12 jobs: {busy}")
        for when, counts in (("idle", idle), ("after 12 jobs", busy)):
            ours = sum(n for name, n in counts.items() if name != "other")
            assert ours <= CONNECTION_BUDGET, f"{when}: {ours} connections ({counts})"
    finally:
        for process in processes.values():
            process.stop()
        server.stop()


def test_requirements_txt_pins_every_runtime_dependency_as_installed() -> None:
    """requirements.txt is pyproject.toml's runtime dependencies and what they need, pinned
    to the versions installed here (scripts/requirements.py writes it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("requirements_script", ROOT / "scripts" / "requirements.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    direct = script.direct_requirements()
    text = (ROOT / "requirements.txt").read_text()
    assert text == script.render(script.pinned(direct)), \
        "requirements.txt is out of step: run .venv/bin/python scripts/requirements.py"
    pins = dict(line.split("==") for line in text.splitlines() if line and not line.startswith("#"))
    for requirement in direct:
        name = script.canonicalize_name(requirement.name)
        assert requirement.specifier.contains(pins[name]), f"{requirement} but {name}=={pins[name]} pinned"


def test_python_version_file_names_the_python_the_tests_run_on() -> None:
    import sys
    import tomllib

    from packaging.specifiers import SpecifierSet

    wanted = (ROOT / ".python-version").read_text().strip()
    assert wanted == f"{sys.version_info.major}.{sys.version_info.minor}"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(f"{wanted}.0")


def app_files() -> list[str]:
    """What a push of this working tree would carry: tracked and new files, not ignored ones."""
    import subprocess

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [name for name in listed if (ROOT / name).is_file()]


@pytest.mark.slow
def test_a_buildpack_style_install_runs_the_procfile(tmp_path: Path, logs_dir: Path,
                                                     own_redis: tuple[str, redis.Redis], live_nodes: Any) -> None:
    """As Heroku's Python buildpack does: a fresh venv of the .python-version Python,
    ``pip install -r requirements.txt``, then the Procfile's commands from the app's folder
    with $PORT and REDIS_URL, and nothing of this checkout or its venv on the paths."""
    import shutil
    import subprocess
    import sys

    app = tmp_path / "app"
    for name in app_files():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, app / name)
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=120)  # type: ignore[attr-defined]
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", "requirements.txt"], cwd=app,
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]

    url, _ = own_redis
    env = {k: v for k, v in clean_env(url, **FAST).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    web_port = free_port()
    processes = [Process(name, ["bash", "-c", f"exec {command}"], {**env, "PORT": str(web_port)}, logs_dir, cwd=app)
                 for name, command in procfile_commands(app / "Procfile").items() if name != "flower"]
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=1) as response:
                    return response.status == 200
            except OSError:
                return False
        wait_for(healthy, 30, 0.2, what=f"web on $PORT={web_port}")
        worker = next(p for p in processes if p.name == "worker")
        wait_for(lambda: "ready." in worker.log(), 30, 0.2, what="the worker ready")
        web = types.SimpleNamespace(ws_url=f"ws://127.0.0.1:{web_port}/ws/node")
        node = live_nodes(web, {"m": "ready"}).wait_ready()
        result = client_app(url).send_task("dispatcher.submit_job", kwargs={"job_type": "t", "required_models": ["m"]})
        node.succeed(node.take_job(), {"built": "like a slug"})
        assert result.get(timeout=20) == {"built": "like a slug"}
        for process in processes:
            assert str(ROOT) not in process.log(), f"{process.name} used this checkout"
    finally:
        for process in processes:
            process.stop()


def procfile_commands(procfile: Path) -> dict[str, str]:
    commands = {}
    for line in procfile.read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and not name.startswith("#"):
            commands[name.strip()] = command.strip()
    return commands


#: What each process logs each time it tries Redis again.
RETRYING = {"web": '"wake_listener_reconnect"', "worker": "consumer: Cannot connect to redis",
            "beat": "beat: Connection error"}


def retries_after_saying(process: Process, retrying: str) -> list[str]:
    """The process's lines about trying Redis again after its redis_unreachable line."""
    lines = process.log().splitlines()
    said = next(i for i, line in enumerate(lines) if '"redis_unreachable"' in line)
    return [line for line in lines[said + 1:] if retrying in line]


@pytest.mark.slow
def test_each_process_says_once_that_redis_does_not_answer_naming_redis_url(logs_dir: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    env = clean_env(dead, **FAST)
    processes = {name: start_procfile(name, {**env, "PORT": str(free_port())}, logs_dir)
                 for name in ("web", "worker", "beat")}
    try:
        for name, process in processes.items():
            line = wait_for(lambda p=process: next((json.loads(line) for line in p.log().splitlines()
                                                    if '"redis_unreachable"' in line), None),
                            20, 0.2, what=f"{name} saying Redis does not answer")
            assert line["level"] == "ERROR" and line["process_type"] == name
            assert line["redis_url"] == dead and "REDIS_URL" in line["hint"], line
        for name, process in processes.items():  # each tries again, twice, after saying it
            wait_for(lambda p=process, n=name: len(retries_after_saying(p, RETRYING[n])) >= 2, 20, 0.2,
                     what=f"{name} trying Redis again")
        for name, process in processes.items():
            assert process.alive(), f"{name} keeps trying (a managed Redis restarts)"
            said = [line for line in process.log().splitlines() if '"redis_unreachable"' in line]
            assert len(said) == 1, f"{name} said it once"
    finally:
        for process in processes.values():
            process.stop()
