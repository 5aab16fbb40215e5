"""``dispatcher up``: the whole system on one machine, from the same Procfile.

When ``REDIS_URL`` is unset it starts a private redis-server (AOF on) under
``.data/redis``; then honcho runs the Procfile's processes and a few demo node
agents, and a demo job goes through once a node is ready.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from honcho.environ import parse_procfile
from honcho.manager import Manager

from dispatcher.localrun.redis_server import LocalRedis, free_port

#: Settings the local run uses unless the environment says otherwise: a laptop
#: has no GPU, is busy with other things, and a newcomer should not wait 45 s.
DEMO_DEFAULTS = {
    "DISPATCHER_REQUIRE_GPU": "false",
    "DISPATCHER_RESOURCE_THRESHOLD_PERCENT": "95",
    "DISPATCHER_HEARTBEAT_INTERVAL_SECONDS": "2",
    "DISPATCHER_HEARTBEAT_TIMEOUT_SECONDS": "8",
    "DISPATCHER_PERIODIC_SCAN_INTERVAL_SECONDS": "5",
}
#: The README's CLI example, which the demo nodes can run (their handler answers ``asr``).
SUBMIT_EXAMPLE = ("dispatcher submit --type asr --model whisper-large-v3 "
                  "--payload '{\"audio_url\": \"https://example.com/hello.wav\"}'")
#: The port the private Redis prefers, so that a re-run finds its data on the same address.
LOCAL_REDIS_PORT = 6390


def _say(text: str) -> None:
    print(f"\033[1m[dispatcher up]\033[0m {text}", flush=True)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


#: The ports the local run listens on: variable, default, what listens there.
PORTS = (("PORT", "8000", "the web process"), ("FLOWER_PORT", "5555", "Flower"))


def ports_taken(env: dict[str, str]) -> list[str]:
    """What is wrong with the ports the local run would listen on (nothing when all are free),
    each naming the variable that moves it."""
    import socket

    problems = []
    for variable, default, who in PORTS:
        port = int(env.get(variable) or default)
        with socket.socket() as s:
            # As gunicorn and Flower bind: a port whose last connections are in TIME_WAIT (a run
            # stopped a moment ago) is free for them, and must be for this check too.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                problems.append(f"port {port} ({who}) is taken by another program: set {variable} to a free "
                                f"port, e.g. {variable}={port + 1} ./scripts/up")
    return problems


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


def _wait(predicate: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.5)
    return None


def demo_job(redis_url: str, url: str) -> None:
    """Submit one job as a client would (only celery, the contract's task name) and print its result."""
    from celery import Celery

    client = Celery(broker=redis_url, backend=redis_url)
    result = client.send_task("dispatcher.submit_job", kwargs={
        "job_type": "sleep", "payload": {"seconds": 1, "text": "hello from the demo job"},
        "required_models": ["whisper-large-v3"], "timeout_seconds": 30, "dispatch_timeout_seconds": 30})
    _say(f"demo job {result.id} submitted (dispatcher.submit_job); state {result.state}")
    try:
        output = result.get(timeout=60)
    except Exception as exc:  # noqa: BLE001 - tell the newcomer, keep the system running
        _say(f"demo job failed: {type(exc).__name__}: {exc}")
        return
    job = _get_json(f"{url}/api/jobs/{result.id}")
    _say(f"demo job done on node {job['node_id']} (attempt {job['attempt']}): {json.dumps(output)}")
    _say(f"its record: {url}/api/jobs/{result.id}")


def run_local(root: Path, demo_nodes: int = 2) -> int:
    data = root / ".data"
    env = dict(os.environ)
    taken = ports_taken(env)
    for problem in taken:
        _say(problem)
    if taken:
        return 1
    redis_server = None
    if not env.get("REDIS_URL"):
        port = LOCAL_REDIS_PORT if _port_free(LOCAL_REDIS_PORT) else free_port()
        redis_server = LocalRedis(data / "redis", port=port, append_only=True).start()
        env["REDIS_URL"] = redis_server.url
        _say(f"started a private redis-server on {redis_server.url} (AOF in {data / 'redis'})")
    else:
        _say(f"using REDIS_URL={env['REDIS_URL']}")
    env.setdefault("PORT", "8000")
    env.setdefault("FLOWER_PORT", "5555")
    env.setdefault("FLOWER_UNAUTHENTICATED_API", "true")  # a local run; set FLOWER_BASIC_AUTH elsewhere
    # Registration and the admin API are open here: only this machine may reach them.
    env.setdefault("WEB_ADDRESS", "127.0.0.1")
    env.setdefault("FLOWER_ADDRESS", "127.0.0.1")
    for key, value in DEMO_DEFAULTS.items():
        if key not in env:
            env[key] = value
            _say(f"demo default {key}={value} (set it to override)")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"

    manager = Manager()
    procfile = parse_procfile((root / "Procfile").read_text())
    for name, command in procfile.processes.items():
        manager.add_process(name, command, env=env, cwd=str(root))
    url = f"http://127.0.0.1:{env['PORT']}"
    for i in range(1, demo_nodes + 1):
        state = data / "agents" / f"node-{i}.json"
        command = (f"dispatcher-agent --url ws://127.0.0.1:{env['PORT']}/ws/node --state-file {state} "
                   f"--model whisper-large-v3 --model nllb-200 --label demo=node-{i} --max-concurrent-jobs 2 "
                   "--accept-public-jobs")
        manager.add_process(f"node{i}", command, env=env, cwd=str(root))

    def narrate() -> None:
        if not _wait(lambda: _get_json(f"{url}/readyz")["status"] == "ok", 60):
            _say(f"the web process did not answer on {url}; see its lines above")
            return
        _say(f"web is up: the fleet page at {url}/ , the API at {url}/api/nodes , metrics at {url}/metrics")
        _say(f"Flower at http://127.0.0.1:{env['FLOWER_PORT']}/ ; the CLI, from another terminal:")
        _say(f"  export REDIS_URL={env['REDIS_URL']} DISPATCHER_URL={url}")
        _say("  .venv/bin/dispatcher nodes")
        _say(f"  .venv/bin/{SUBMIT_EXAMPLE}")
        if not _wait(lambda: _get_json(f"{url}/api/nodes")["counts"]["ready"] >= 1, 60):
            _say("no node became ready within 60 s; see the node lines above")
            return
        counts = _get_json(f"{url}/api/nodes")["counts"]
        _say(f"nodes: {', '.join(f'{n} {s}' for s, n in counts.items() if n)}")
        demo_job(env["REDIS_URL"], url)
        _say("running; Ctrl-C stops everything")

    threading.Thread(target=narrate, daemon=True).start()
    try:
        manager.loop()
    finally:
        if redis_server is not None:
            redis_server.stop()
            _say("stopped the private redis-server")
    return manager.returncode or 0
