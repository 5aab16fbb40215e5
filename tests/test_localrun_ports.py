"""The local run's port check (dispatcher/localrun/run.py), without processes."""

from __future__ import annotations

import socket

from dispatcher.localrun.redis_server import free_port
from dispatcher.localrun.run import ports_taken


def test_a_port_someone_listens_on_is_taken_and_says_which_variable_moves_it() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert ports_taken({"PORT": str(port), "FLOWER_PORT": str(free_port())}) == [
            f"port {port} (the web process) is taken by another program: set PORT to a free port, "
            f"e.g. PORT={port + 1} ./scripts/up"]


def test_a_port_just_let_go_is_free_as_the_servers_see_it() -> None:
    """A run stopped a moment ago leaves its port's connections in TIME_WAIT: gunicorn binds
    it again (SO_REUSEADDR), so the check must not refuse it."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn's own listener
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server's side closes first: its end of the connection waits
        client.close()
    with socket.socket() as plain, socket.socket() as reusing:
        try:
            plain.bind(("127.0.0.1", port))
            in_time_wait = False
        except OSError:
            in_time_wait = True
        assert in_time_wait, "the test made the port wait (else it proves nothing)"
        reusing.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reusing.bind(("127.0.0.1", port))  # as gunicorn does
    assert ports_taken({"PORT": str(port), "FLOWER_PORT": str(free_port())}) == []
