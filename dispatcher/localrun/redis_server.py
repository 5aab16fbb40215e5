"""A private redis-server for the local run and the tests (never the machine's own)."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from dispatcher.errors import ConfigError

#: Ports handed out for servers, below Linux's default ephemeral range (32768-60999): a
#: port the kernel picked for us would be free now but may be any client's a moment later.
_SERVER_PORTS = range(20000, 32768)


def free_port() -> int:
    """A port no process listens on now, outside the range outgoing connections take theirs from."""
    for _ in range(100):
        port = random.choice(_SERVER_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise OSError("no free port found")


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError(
            "redis-server is not installed: install it (Debian/Ubuntu: sudo apt-get install redis-server) "
            "or set REDIS_URL to a Redis you run yourself")
    return binary


class LocalRedis:
    """A redis-server child process on 127.0.0.1; stopped with ``stop()``."""

    def __init__(self, data_dir: Path, port: int | None = None, append_only: bool = True,
                 appendfsync: str = "everysec") -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.append_only = append_only
        #: "always" loses nothing to a crash (SIGKILL), at the cost of a write per command.
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir.resolve()), "--save", "",
            "--appendonly", "yes" if self.append_only else "no", "--appendfsync", self.appendfsync,
            "--logfile", "redis.log", "--maxclients", "10000",
        ]
        # Its own session: a Ctrl-C meant for the processes using it must not stop it before them.
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.data_dir / "redis.log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise ConfigError(f"redis-server did not start on port {self.port}: {tail}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
