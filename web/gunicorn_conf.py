"""gunicorn settings for the web process (``gunicorn -c python:web.gunicorn_conf``)."""

from __future__ import annotations

import gc
import os
import resource
import shutil
import tempfile
from typing import Any

# The web process's own metrics (each worker's session count) are kept in a multiprocess
# folder of its own, made here, before any worker imports prometheus-client: no other
# process (a Celery worker, Flower) writes there, whatever PROMETHEUS_MULTIPROC_DIR the
# environment names. The fleet's counters come from Redis (dispatcher/metrics.py).
_METRICS_DIR = tempfile.mkdtemp(prefix="dispatcher-web-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _METRICS_DIR

from dispatcher.logs import json_formatter, watch_gc_pauses  # noqa: E402 - after the folder is chosen
from dispatcher.settings import get_settings  # noqa: E402

_settings = get_settings()

# 0.0.0.0 on a platform (its router reaches $PORT from outside); the local run sets
# WEB_ADDRESS=127.0.0.1, as it binds Flower.
bind = f"{os.environ.get('WEB_ADDRESS') or '0.0.0.0'}:{_settings.port}"
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
# Node sessions and HTTP requests share this budget per worker: past it even
# /healthz waits, so it is sized for the fleet we promise, not left at 1,000.
worker_connections = _settings.web_worker_connections
timeout = 30
graceful_timeout = 10
keepalive = 5
wsgi_app = "web.app:create_app()"
# The control socket is unused and wants a writable home folder (not a given on a PaaS).
control_socket_disable = True
accesslog = None
errorlog = "-"
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": json_formatter}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
    "root": {"level": "INFO", "handlers": ["stdout"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["stdout"], "propagate": False},
        "gunicorn.access": {"level": "WARNING", "handlers": ["stdout"], "propagate": False},
    },
}


def on_starting(server: object) -> None:
    # One file descriptor per session: lift the soft limit to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _settings.web_worker_connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        lifted = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
        resource.setrlimit(resource.RLIMIT_NOFILE, (lifted, hard))


def post_worker_init(worker: Any) -> None:
    # What exists now (imported modules, the app) lives for ever: keep it out of
    # every later full collection, whose pause grows with the objects it walks.
    gc.freeze()
    watch_gc_pauses(_settings.gc_pause_log_ms)
    # Here, not in the master: redis (and ssl) must be imported after gevent patches them.
    from dispatcher.connection import say_if_unreachable

    say_if_unreachable(_settings, "web")
    if os.environ.get("BENCH_PROBE"):
        _bench_probe()
    # Start the session hub in the worker (after the fork); absent when serving another app.
    hub = worker.wsgi.extensions.get("dispatcher.hub")
    if hub is not None:
        import signal

        import gevent

        from web import gcpolicy

        gcpolicy.start()
        gevent.signal_handler(signal.SIGUSR2, gcpolicy.reclaim)
        # On SIGTERM gunicorn only stops accepting and waits for open connections;
        # node sessions never end by themselves, so the hub closes them.
        hub.stop_when(lambda: not worker.alive)
        hub.start()


def _bench_probe() -> None:
    """bench/sessions.py only (BENCH_PROBE set): on SIGUSR1 the worker logs its count of
    Python objects (the frozen ones too) and the most common types among those not frozen."""
    import collections
    import logging
    import signal

    import gevent

    from dispatcher.logs import log_event, report_gc_pauses

    def probe() -> None:
        report_gc_pauses()
        objects = gc.get_objects()
        types = collections.Counter(type(o).__name__ for o in objects).most_common(25)
        log_event(logging.getLogger("bench.probe"), "bench_probe", objects=len(objects) + gc.get_freeze_count(),
                  frozen=gc.get_freeze_count(), types=dict(types))
        del objects

    gevent.signal_handler(signal.SIGUSR1, probe)


def child_exit(server: object, worker: Any) -> None:
    # A dead worker's live gauges (its session count) must not linger in /metrics.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _METRICS_DIR)


def on_exit(server: object) -> None:
    shutil.rmtree(_METRICS_DIR, ignore_errors=True)
