"""The measurements of bench/hostile.py, all timestamped, so that each case reads its own window.

HTTP probes (GET a URL every so often) and the watch on the web worker's and
redis-server's memory, CPU and file descriptors, which also trips the memory cap.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import psutil

from hostile_system import System


def now_s() -> float:
    """Wall-clock seconds: every sample and job record is stamped with these."""
    return time.time()


class Samples:
    """(time.time(), value) pairs appended from any thread; trimmed between cases to stay small."""

    def __init__(self) -> None:
        self._items: list[tuple[float, Any]] = []
        self._lock = threading.Lock()

    def add(self, value: Any, at_s: float | None = None) -> None:
        with self._lock:
            self._items.append((now_s() if at_s is None else at_s, value))

    def between(self, t0_s: float, t1_s: float) -> list[Any]:
        with self._lock:
            return [v for t, v in self._items if t0_s <= t <= t1_s]

    def last_before(self, t_s: float) -> Any | None:
        with self._lock:
            earlier = [v for t, v in self._items if t <= t_s]
        return earlier[-1] if earlier else None

    def latest(self, n: int) -> list[Any]:
        with self._lock:
            return [v for _, v in self._items[-n:]]

    def trim_before(self, t_s: float) -> None:
        with self._lock:
            self._items = [(t, v) for t, v in self._items if t >= t_s]


class Loop(threading.Thread):
    """A daemon thread calling ``step()`` every ``every_s`` until stopped."""

    def __init__(self, name: str, every_s: float, step: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.every_s = every_s
        self.step = step
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            started_s = time.monotonic()
            self.step()
            self.stopping.wait(max(0.0, self.every_s - (time.monotonic() - started_s)))

    def stop(self) -> None:
        self.stopping.set()


#: No proxy, whatever the environment says: every request goes to the local web process.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout_s: float) -> tuple[float, int, str | None]:
    """(elapsed ms, body bytes, error or None); the body is read in chunks and dropped."""
    started = time.perf_counter()
    size_bytes = 0
    try:
        with HTTP.open(url, timeout=timeout_s) as response:
            while chunk := response.read(1 << 20):
                size_bytes += len(chunk)
            error = None if response.status == 200 else f"HTTP {response.status}"
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is the figure
        error = f"{type(exc).__name__}: {exc}"[:160]
    return (time.perf_counter() - started) * 1000, size_bytes, error


class HttpProber:
    """GETs one URL every ``every_s`` (the next waits for the previous) and records each answer."""

    def __init__(self, url: str, every_s: float, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.samples = Samples()  # (latency_ms, bytes, error)
        self._loop = Loop(f"probe {url}", every_s, self._probe)

    def _probe(self) -> None:
        started_s = now_s()
        self.samples.add(http_get(self.url, self.timeout_s), at_s=started_s)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()


class WebWatch:
    """Samples the gunicorn worker and redis-server (RSS, CPU seconds, fds) and trips the memory cap."""

    #: Seconds between samples (the CPU percentage of a window counts on it).
    EVERY_S = 0.25

    def __init__(self, system: System, rss_cap_mb: float, min_available_mb: float) -> None:
        self.system = system
        self.rss_cap_mb = rss_cap_mb
        self.min_available_mb = min_available_mb
        self.samples = Samples()
        self.cap_hit = threading.Event()
        self.cap_reason = ""
        self._loop = Loop("web watch", self.EVERY_S, self._sample)

    def _sample(self) -> None:
        worker = self.system.web_worker()
        sample: dict[str, Any] = {"pid": None, "rss_mb": None, "cpu_s": None, "fds": None}
        try:
            if worker is not None:
                with worker.oneshot():
                    times = worker.cpu_times()
                    sample.update(pid=worker.pid, rss_mb=worker.memory_info().rss / 2**20,
                                  cpu_s=times.user + times.system, fds=worker.num_fds())
        except psutil.Error:
            pass
        store = self.system.redis_process()
        try:
            sample["redis_rss_mb"] = store.memory_info().rss / 2**20 if store else None
        except psutil.Error:
            sample["redis_rss_mb"] = None
        sample["available_mb"] = psutil.virtual_memory().available / 2**20
        self.samples.add(sample)
        if sample["rss_mb"] is not None and sample["rss_mb"] > self.rss_cap_mb:
            self._trip(f"web worker RSS {sample['rss_mb']:.0f} MiB > cap {self.rss_cap_mb:.0f} MiB")
        elif sample["available_mb"] < self.min_available_mb:
            self._trip(f"machine's available memory {sample['available_mb']:.0f} MiB < {self.min_available_mb:.0f} MiB")

    def _trip(self, reason: str) -> None:
        if not self.cap_hit.is_set():
            self.cap_reason = reason
            self.cap_hit.set()

    def latest(self) -> dict[str, Any]:
        last = self.samples.latest(1)
        return last[0] if last else {}

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
