"""gunicorn config for a fault test: the web process dies (master and worker,
as a crashed machine would) right after popping a job_assign from a node's
queue, before sending it. Armed by the file named in FAULT_FLAG; fires once."""

import os
import signal
from pathlib import Path

from web import gunicorn_conf as _base
from web.gunicorn_conf import *  # noqa: F403 - the production settings, unchanged

_FLAG = Path(os.environ["FAULT_FLAG"])


def post_worker_init(worker: object) -> None:
    _base.post_worker_init(worker)
    from web.session import NodeSession

    send = NodeSession.send

    def send_or_die(self: NodeSession, frame: str) -> bool:
        if '"type":"job_assign"' in frame and _FLAG.exists():
            _FLAG.unlink()
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return send(self, frame)
    NodeSession.send = send_or_die  # type: ignore[method-assign]
