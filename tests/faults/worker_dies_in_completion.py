"""Celery app for a fault test: the whole worker dies (SIGKILL to its process
group) as a complete_job task starts, before it changes anything. Armed by the
file named in FAULT_FLAG; fires once."""

import os
import signal
from pathlib import Path
from typing import Any

from celery.signals import task_prerun

from dispatcher.celery_app import app  # noqa: F401 - celery -A finds it here

_FLAG = Path(os.environ["FAULT_FLAG"])


@task_prerun.connect
def _die(sender: Any = None, **_: Any) -> None:
    if sender is not None and sender.name == "dispatcher.complete_job" and _FLAG.exists():
        _FLAG.unlink()
        os.killpg(os.getpgid(0), signal.SIGKILL)
