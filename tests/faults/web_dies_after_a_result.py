"""gunicorn config for a fault test: the web process dies (master and worker, as a
crashed machine would) right after it handed a node's result on to the workers,
before anything else. Armed by the file named in FAULT_FLAG; fires once."""

import os
import signal
from pathlib import Path
from typing import Any

from web import gunicorn_conf as _base
from web.gunicorn_conf import *  # noqa: F403 - the production settings, unchanged

_FLAG = Path(os.environ["FAULT_FLAG"])


def post_worker_init(worker: object) -> None:
    _base.post_worker_init(worker)
    from dispatcher.jobs import Jobs

    report = Jobs.report_result

    def report_then_die(self: Jobs, *args: Any, **kwargs: Any) -> bool:
        handed_on = report(self, *args, **kwargs)
        if _FLAG.exists():
            _FLAG.unlink()
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return handed_on
    Jobs.report_result = report_then_die  # type: ignore[method-assign]
