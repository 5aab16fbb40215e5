"""The node handler of bench/chaos.py: a short job whose every execution is written down.

The agent runs it as ``--handler chaos_handler:run`` (with ``bench/`` on
PYTHONPATH). It works 20-300 ms, then returns ``{"n": payload["n"], "attempt":
attempt}`` so the bench can check the output against the payload and against
the attempt the dispatcher recorded as the one that succeeded.

Each start and end is appended, one JSON line, to ``$CHAOS_RUNS_DIR/<pid>.jsonl``
through an unbuffered O_APPEND descriptor: the line is in the kernel as soon as
``os.write`` returns, so a SIGKILL a moment later loses nothing. The bench
counts the (job_id, attempt) pairs started more than once.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from typing import Any

from dispatcher.agent.runner import JobContext, JobFailed

_lock = threading.Lock()
_fd: int | None = None


def _record(event: str, job: dict[str, Any]) -> None:
    global _fd
    line = json.dumps({"event": event, "job_id": job["job_id"], "attempt": job["attempt"],
                       "node": os.environ.get("CHAOS_NODE"), "pid": os.getpid(), "t": time.time()}) + "\n"
    with _lock:  # two job threads share the descriptor: one whole line per write
        if _fd is None:
            path = os.path.join(os.environ["CHAOS_RUNS_DIR"], f"{os.getpid()}.jsonl")
            _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(_fd, line.encode())


def run(job: dict[str, Any], ctx: JobContext) -> Any:
    _record("start", job)
    if ctx.cancelled.wait(random.uniform(0.02, 0.3)):
        raise JobFailed("CANCELLED", "cancelled", retryable=False)
    _record("end", job)
    return {"n": job["payload"]["n"], "attempt": job["attempt"]}
