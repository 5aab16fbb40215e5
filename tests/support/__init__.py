"""What the tests share, by topic. A test module imports helpers from here, never from
another test module or from conftest.py (which holds the fixtures, and imports from here).

- ``core``: the core in the test process on real Redis, with the clock injected: nodes
  registered and heartbeating (``register``, ``beat``, ``make_ready``, ``add_node``),
  results applied as a worker does (``apply_result``), records checked against their
  indexes (``assert_consistent``), a Celery client (``client_app``).
- ``sessions``: node sessions over real WebSockets (``NodeClient``, ``LiveNode``,
  ``RawSocket``, ``ready_node``).
- ``processes``: real processes (``Process``, ``WebServer``, ``start_procfile``,
  ``run_cli``), their environment (``clean_env``) and their JSON logs (``log_events``).
- ``waiting``: ``wait_for``, and the positive signals that prove a moment has passed
  (``wait_for_scans``, ``wait_until_acknowledged``).
- ``metrics``: /metrics parsed (``scrape``, ``parse_metrics``).

Everything is importable from ``tests.support`` itself. (``tests/fuzzing.py``, the fuzzer's
frames and checks, stays where bench/fuzz.py imports it from.)
"""

from tests.support.core import (
    CORE_PREFIX,
    T0,
    add_node,
    apply_result,
    assert_consistent,
    beat,
    client_app,
    forget_everything,
    job_attempts,
    make_ready,
    register,
)
from tests.support.metrics import Samples, parse_metrics, scrape
from tests.support.processes import (
    PYTHON,
    ROOT,
    Process,
    WebServer,
    clean_env,
    cli_env,
    log_events,
    procfile_command,
    run_cli,
    start_procfile,
    web_worker_rss,
)
from tests.support.sessions import SYNC_TYPE, LiveNode, NodeClient, RawSocket, integral_floats, ready_node
from tests.support.waiting import unacked_ids, wait_for, wait_for_scans, wait_until_acknowledged

__all__ = [
    "CORE_PREFIX", "PYTHON", "ROOT", "SYNC_TYPE", "T0", "LiveNode", "NodeClient", "Process", "RawSocket", "Samples",
    "WebServer", "add_node", "apply_result", "assert_consistent", "beat", "clean_env", "cli_env", "client_app",
    "forget_everything", "integral_floats", "job_attempts", "log_events", "make_ready", "parse_metrics",
    "procfile_command", "ready_node", "register", "run_cli", "scrape", "start_procfile", "unacked_ids", "wait_for",
    "wait_for_scans", "wait_until_acknowledged", "web_worker_rss",
]
