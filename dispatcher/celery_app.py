"""The Celery app of the dispatcher (``celery -A dispatcher.celery_app``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from celery import Celery
from celery.signals import beat_init, celeryd_after_setup, setup_logging

import dispatcher.brokerfix  # patches kombu's Redis transport on import (see there)
import dispatcher.revoke  # noqa: F401 - Celery's revoke cancels the job (registers the worker's handler)
from dispatcher.completions import CompletionStep
from dispatcher.connection import say_if_unreachable
from dispatcher.core import Core, process_core
from dispatcher.logs import configure_logging
from dispatcher.settings import get_settings

#: The app's folder when the package runs from one (a checkout, an editable install, a platform's
#: copy of the checkout): celeryconfig.py sits at its top, beside the package, as the Procfile does.
APP_DIR = Path(__file__).resolve().parent.parent


def load_celeryconfig() -> ModuleType:
    """Celery's configuration: the app folder's celeryconfig.py, whatever the working folder.
    It is not installed into site-packages (a top-level ``celeryconfig`` there would be any
    Celery app's); a package installed without its folder finds one in the working folder
    or on ``sys.path``, where Celery itself looks."""
    path = APP_DIR / "celeryconfig.py"
    if not (APP_DIR / "Procfile").is_file() or not path.is_file():
        from celery.utils.imports import import_from_cwd

        try:
            found: ModuleType = import_from_cwd("celeryconfig")
        except ImportError as exc:
            raise ImportError("no celeryconfig.py beside the dispatcher package nor in the working folder: "
                              "run the processes from the app's folder") from exc
        return found
    loaded = sys.modules.get("celeryconfig")
    if loaded is not None and Path(loaded.__file__ or "").resolve() == path:
        return loaded  # imported by name already (PYTHONPATH naming the app's folder)
    spec = importlib.util.spec_from_file_location("celeryconfig", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.setdefault("celeryconfig", module)  # `import celeryconfig` gets this one, unless taken
    return module


def __getattr__(name: str) -> Any:
    # Celery reads its configuration when it is first needed, not on import (tests name their
    # Redis first): "dispatcher.celery_app:celeryconfig" below loads it then, through here.
    if name == "celeryconfig":
        return load_celeryconfig()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


app = Celery("dispatcher", include=["dispatcher.tasks"])
app.config_from_object("dispatcher.celery_app:celeryconfig")
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
