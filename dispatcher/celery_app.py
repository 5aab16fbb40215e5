"""The Celery app of the dispatcher (``celery -A dispatcher.celery_app``)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import setup_logging

import dispatcher.brokerfix  # noqa: F401 - patches kombu's Redis transport on import (see there)
import dispatcher.revoke  # noqa: F401 - Celery's revoke cancels the job (registers the worker's handler)
from dispatcher.completions import CompletionStep
from dispatcher.logs import configure_logging
from dispatcher.settings import get_settings

app = Celery("dispatcher", include=["dispatcher.tasks"])
app.config_from_object("celeryconfig")
# Every worker applies the nodes' results as they come (dispatcher/completions.py).
app.steps["worker"].add(CompletionStep)


@setup_logging.connect
def _json_logs(**_: Any) -> None:
    # Connecting here stops Celery from installing its own handlers.
    configure_logging(get_settings().log_level)
