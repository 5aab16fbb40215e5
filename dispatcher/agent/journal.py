"""The attempts this node started and finished, on disk, so that a restarted agent
never runs an attempt twice.

Delivery is at least once: a node that resumes is sent its assigned jobs again,
including ones it was running, or had finished, when its process died. The
journal tells which: a finished attempt's result is sent again; an attempt
that was cut short by the crash is reported failed (``NODE_RESTARTED``,
retryable), so that the server runs the job again as a new attempt, on a
record, instead of this node silently running the same attempt twice.

One JSON line per event, appended and fsynced before the job runs and
before its result leaves; mode 0600 beside the state file. It keeps the
newest ``REMEMBERED`` attempts: when it grows past twice that, it is rewritten
with those only.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

#: Attempts remembered (as the runner remembers finished ones in memory).
REMEMBERED = 1000
#: Results larger than this are not kept: a redelivery of that attempt is then
#: reported failed (retryable) rather than run again.
MAX_KEPT_RESULT_BYTES = 64 * 1024

Key = tuple[str, int]


class JobJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        #: (job id, attempt) -> the result frame once finished (None while running, or when too large).
        self.attempts: OrderedDict[Key, dict[str, Any] | None] = OrderedDict()
        self.finished: set[Key] = set()
        self._lines = 0
        self._load()

    def _load(self) -> None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                key = (str(entry["job_id"]), int(entry["attempt"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the crash
            self.attempts[key] = entry.get("result")
            self.attempts.move_to_end(key)
            if entry.get("event") == "finished":
                self.finished.add(key)
        self._compact()

    def interrupted(self, key: Key) -> bool:
        """Started by an earlier process of this agent, never finished."""
        return key in self.attempts and key not in self.finished

    def result(self, key: Key) -> dict[str, Any] | None:
        return self.attempts.get(key) if key in self.finished else None

    def started(self, job_id: str, attempt: int) -> None:
        self._append({"event": "started", "job_id": job_id, "attempt": attempt})
        with self._lock:
            self.attempts[(job_id, attempt)] = None

    def ended(self, job_id: str, attempt: int, frame: dict[str, Any]) -> None:
        kept = frame if len(json.dumps(frame)) <= MAX_KEPT_RESULT_BYTES else None
        self._append({"event": "finished", "job_id": job_id, "attempt": attempt, "result": kept})
        with self._lock:
            self.attempts[(job_id, attempt)] = kept
            self.finished.add((job_id, attempt))

    def _append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._lines += 1
            if self._lines > 2 * REMEMBERED:
                self._compact()

    def _compact(self) -> None:
        """Rewrite the file with the newest REMEMBERED attempts only (atomically)."""
        while len(self.attempts) > REMEMBERED:
            key, _ = self.attempts.popitem(last=False)
            self.finished.discard(key)
        lines = []
        for (job_id, attempt), result in self.attempts.items():
            event = "finished" if (job_id, attempt) in self.finished else "started"
            lines.append(json.dumps({"event": event, "job_id": job_id, "attempt": attempt, "result": result},
                                    separators=(",", ":")))
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._lines = len(lines)
