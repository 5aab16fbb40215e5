"""A node installs the agent's extra only: no Celery, Flask, gevent or Redis client
(pyproject.toml), and ``dispatcher-agent`` runs without them."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from packaging.utils import canonicalize_name

from dispatcher.keys import Keys
from tests.support import PYTHON, ROOT, Process, clean_env, wait_for

#: What a server installs and a node must not (distribution names).
SERVER_ONLY = frozenset({"celery", "kombu", "redis", "hiredis", "flask", "flask-sock", "simple-websocket", "gunicorn",
                         "gevent", "flower", "honcho", "pydantic-settings", "prometheus-client"})
#: Their modules (and those of what they bring along), refused to the agent's process.
REFUSED_MODULES = ("celery", "kombu", "redis", "hiredis", "flask", "flask_sock", "simple_websocket", "gunicorn",
                   "gevent", "flower", "honcho", "pydantic_settings", "prometheus_client", "billiard", "amqp",
                   "werkzeug", "wsproto", "tornado")

#: Prepended to the agent's Python: any import of a refused module fails, as on a node without them.
REFUSE_IMPORTS = f"""
import importlib.abc, sys

REFUSED = {REFUSED_MODULES!r}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in REFUSED:
            raise ImportError(f"{{name}} is not installed on a node (the agent's extra only)")
        return None

sys.meta_path.insert(0, Refuse())
"""


def requirements_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("requirements_script", ROOT / "scripts" / "requirements.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_agent_extra_brings_none_of_the_servers_packages() -> None:
    """From pyproject.toml and the metadata of the packages installed here: what the base
    dependencies and each extra need, all the way down."""
    script = requirements_script()
    agent = set(script.pinned(script.direct_requirements(extras=("agent",))))
    server = set(script.pinned(script.direct_requirements(extras=("server",))))
    assert server >= SERVER_ONLY, "the server installs each of them (or this list names nothing)"
    assert {"pydantic", "websockets", "psutil", "nvidia-ml-py"} <= agent
    assert not agent & SERVER_ONLY


@pytest.mark.slow
def test_pip_installs_the_agent_extra_without_the_servers_packages(tmp_path: Path) -> None:
    """What pip itself would install for ``gpu-dispatcher[agent]`` in an empty environment
    (its resolver, a dry run: nothing is installed)."""
    report = tmp_path / "report.json"
    done = subprocess.run([PYTHON, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), f"{ROOT}[agent]"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    installed = {canonicalize_name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    assert {"gpu-dispatcher", "pydantic", "websockets", "psutil", "nvidia-ml-py"} <= installed
    assert not installed & SERVER_ONLY


@pytest.mark.slow
def test_the_agent_and_the_messages_import_without_the_servers_packages() -> None:
    code = REFUSE_IMPORTS + """
try:
    import celery
except ImportError:
    pass
else:
    raise SystemExit("the refusal does not work")
import dispatcher.agent.__main__, dispatcher.agent.handlers, dispatcher.messages
print(sorted(name for name in sys.modules if name.partition(".")[0] in REFUSED))
"""
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60,
                          env=clean_env("redis://127.0.0.1:1/0"), cwd=ROOT)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr[-3000:]


def test_the_agent_serves_as_a_node_without_the_servers_packages(start_web: Any, r: redis.Redis, tmp_path: Path,
                                                                logs_dir: Path) -> None:
    """``python -m dispatcher.agent`` as ``dispatcher-agent`` runs it, every server package
    refused: it registers, becomes ready, and drains itself on SIGTERM."""
    server = start_web(heartbeat_interval_seconds=0.2, heartbeat_timeout_seconds=3)
    state = tmp_path / "agent.json"
    code = REFUSE_IMPORTS + "import runpy; runpy.run_module('dispatcher.agent', run_name='__main__', alter_sys=True)"
    agent = Process("agent-alone", [PYTHON, "-c", code, "--url", server.ws_url, "--state-file", str(state),
                                    "--model", "whisper"], clean_env("redis://127.0.0.1:1/0"), logs_dir, cwd=tmp_path)

    def registered() -> str | None:
        assert agent.alive(), agent.log()[-3000:]
        return json.loads(state.read_text())["node_id"] if state.exists() else None
    try:
        node_id = wait_for(registered, 20, 0.1, what="the agent registered")
        wait_for(lambda: r.hget(Keys().node(node_id), "status") == "ready", 20, 0.1, what="the agent ready")
        agent.signal(signal.SIGTERM)
        assert agent.popen.wait(20) == 0, agent.log()[-3000:]
        assert "not installed on a node" not in agent.log()
    finally:
        agent.kill()
