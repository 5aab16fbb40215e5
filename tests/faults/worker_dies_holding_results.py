"""Celery app for a fault test: the whole worker dies (SIGKILL to its process group)
right after its completion loop read results from the stream, before it applied
any. Armed by the file named in FAULT_FLAG; fires once."""

import os
import signal
from pathlib import Path
from typing import Any

from dispatcher.celery_app import app  # noqa: F401 - celery -A finds it here
from dispatcher.completions import Completions

_FLAG = Path(os.environ["FAULT_FLAG"])
_apply = Completions.apply


def _die_before_applying(self: Completions, entries: list[Any]) -> int:
    if entries and self.consumer != "scan" and _FLAG.exists():
        _FLAG.unlink()
        os.killpg(os.getpgid(0), signal.SIGKILL)
    return _apply(self, entries)


Completions.apply = _die_before_applying  # type: ignore[method-assign]
