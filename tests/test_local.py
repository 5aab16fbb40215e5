"""The local run (``./scripts/up``, ``dispatcher up``) and the README's examples against it."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from dispatcher.localrun.redis_server import free_port
from dispatcher.localrun.run import SUBMIT_EXAMPLE, run_local
from tests.support import PYTHON, ROOT, Process, clean_env, wait_for

README = (ROOT / "README.md").read_text()


def readme_block(language: str, after: str) -> str:
    """The first fenced block of this language after a heading of the README."""
    section = README[README.index(after):]
    found = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert found, f"no {language} block after {after!r}"
    return found.group(1)


def test_the_local_run_says_which_variable_moves_a_taken_port(tmp_path: Path, capsys: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(ROOT / "Procfile", tmp_path / "Procfile")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("FLOWER_PORT", str(port))
        monkeypatch.setenv("PORT", str(free_port()))
        assert run_local(tmp_path) == 1
    said = capsys.readouterr().out
    assert f"port {port} (Flower) is taken by another program: set FLOWER_PORT to a free port" in said
    assert not (tmp_path / ".data").exists(), "nothing started"


def test_the_readme_shows_the_cli_example_the_local_run_prints() -> None:
    assert readme_block("sh", "## Submitting a job").strip() == SUBMIT_EXAMPLE


def listening_addresses(root: psutil.Process) -> dict[int, str]:
    """Port -> address of every socket the process tree listens on."""
    found = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found[conn.laddr.port] = conn.laddr.ip
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_readme_examples_go_through_against_the_local_run(tmp_path: Path, logs_dir: Path,
                                                              own_redis: tuple[str, redis.Redis]) -> None:
    """``dispatcher up`` as ./scripts/up runs it (from a folder of its own, so its demo nodes'
    state stays out of the checkout), then the README's Python example and its CLI example,
    exactly as written."""
    url, _ = own_redis
    web_port, flower_port = free_port(), free_port()
    shutil.copy(ROOT / "Procfile", tmp_path / "Procfile")
    env = {k: v for k, v in clean_env(url).items() if k != "PYTHONPATH"}
    env.update(PORT=str(web_port), FLOWER_PORT=str(flower_port))
    up = Process("up", [str(Path(PYTHON).parent / "dispatcher"), "up"], env, logs_dir, cwd=tmp_path)
    try:
        wait_for(lambda: "nodes: " in up.log() or not up.alive(), 90, 0.3, what="the local run's nodes ready")
        assert up.alive(), up.log()[-3000:]
        client_env = {**env, "DISPATCHER_URL": f"http://127.0.0.1:{web_port}"}
        python = subprocess.run([PYTHON, "-c", readme_block("python", "## Submitting a job")], env=client_env,
                                capture_output=True, text=True, timeout=150)
        assert python.returncode == 0, python.stderr[-3000:]
        assert "(demo transcript of https://example.com/hello.wav)" in python.stdout, python.stdout

        command = shlex.split(readme_block("sh", "## Submitting a job"))
        assert command[0] == "dispatcher"
        cli = subprocess.run([str(Path(PYTHON).parent / "dispatcher"), *command[1:]], env=client_env,
                             capture_output=True, text=True, timeout=150)
        assert cli.returncode == 0, cli.stderr[-3000:]
        assert json.loads(cli.stdout)["text"] == "(demo transcript of https://example.com/hello.wav)"

        listening = listening_addresses(psutil.Process(up.popen.pid))
        assert listening.get(web_port) == "127.0.0.1" and listening.get(flower_port) == "127.0.0.1", listening
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=5) as response:
            assert response.status == 200
    finally:
        up.signal(signal.SIGINT)  # Ctrl-C, as a person stops it
        with contextlib.suppress(subprocess.TimeoutExpired):
            up.popen.wait(20)
        up.stop()
