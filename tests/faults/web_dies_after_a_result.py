"""gunicorn config for a fault test: the web process dies (master and worker, as a
crashed machine would) right after it applied a node's result (one script: our
record and Celery's), before it tells Flower, logs or counts anything. Armed by
the file named in FAULT_FLAG; fires once."""

import os
import signal
from pathlib import Path
from typing import Any

from web import gunicorn_conf as _base
from web.gunicorn_conf import *  # noqa: F403 - the production settings, unchanged

_FLAG = Path(os.environ["FAULT_FLAG"])


def post_worker_init(worker: object) -> None:
    _base.post_worker_init(worker)
    from dispatcher.publish import Publisher

    finished = Publisher.finished

    def die_or_tell(self: Publisher, *args: Any, **kwargs: Any) -> None:
        if _FLAG.exists():
            _FLAG.unlink()
            os.killpg(os.getpgid(0), signal.SIGKILL)
        finished(self, *args, **kwargs)
    Publisher.finished = die_or_tell  # type: ignore[method-assign]
