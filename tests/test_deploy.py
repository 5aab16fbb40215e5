"""Deployable on a Heroku-like platform as is: `honcho start` runs the Procfile
with REDIS_URL a rediss:// (TLS) URL, and a job goes through."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import redis
import trustme

from dispatcher.localredis import free_port, redis_server_binary
from tests.conftest import client_app
from tests.support import PYTHON, ROOT, Process, clean_env, wait_for

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
