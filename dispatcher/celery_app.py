"""The Celery app of the dispatcher (``celery -A dispatcher.celery_app``)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import beat_init, celeryd_after_setup, setup_logging

import dispatcher.brokerfix  # noqa: F401 - patches kombu's Redis transport on import (see there)
import dispatcher.revoke  # noqa: F401 - Celery's revoke cancels the job (registers the worker's handler)
from dispatcher.completions import CompletionStep
from dispatcher.connection import say_if_unreachable
from dispatcher.core import Core, process_core
from dispatcher.logs import configure_logging
from dispatcher.settings import get_settings

app = Celery("dispatcher", include=["dispatcher.tasks"])
app.config_from_object("celeryconfig")
# Every worker applies the nodes' results as they come (dispatcher/completions.py).
app.steps["worker"].add(CompletionStep)


def core() -> Core:
    """This process's core (dispatcher/core.py): the tasks, the completion loop and the
    revoke handler of a process share it. Built on first use (after a prefork worker forks)."""
    return process_core(get_settings(), app)


@setup_logging.connect
def _json_logs(**_: Any) -> None:
    # Connecting here stops Celery from installing its own handlers. The internal tasks (those
    # routed to the internal queue) get no INFO line for each run.
    configure_logging(get_settings().log_level, quiet_tasks=frozenset(app.conf.task_routes))


@celeryd_after_setup.connect
def _check_redis_worker(**_: Any) -> None:
    # Celery retries for ever (a managed Redis restarts for maintenance): say once why it waits.
    say_if_unreachable(get_settings(), "worker")


@beat_init.connect
def _check_redis_beat(**_: Any) -> None:
    say_if_unreachable(get_settings(), "beat")
