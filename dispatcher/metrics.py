"""Prometheus metrics of the dispatcher: the fleet's, the same from any web process.

Counters and histograms are counted in the process where things happen (a web
worker, a Celery worker or one of its pool processes) and added to Redis in sums
once a second (dispatcher/tally.py); ``/metrics`` reads the sums when scraped. A
worker on another host (every process has its own on a PaaS) counts as much as
one beside the web process: prometheus-client's multiprocess mode adds up only
the processes of one host and one folder. The gauges (nodes by status, waiting
jobs, the partition breaker, per-node series when ``metrics_node_series`` asks
for them) are read from Redis too.

The one process-local metric is ``dispatcher_web_sessions``, a series per web
worker. gunicorn's config gives the web process a multiprocess folder of its own
(web/gunicorn_conf.py) that no other process writes to: no Flower series, no
Celery process, and a dead worker's series goes with it (``mark_process_dead``).
"""

from __future__ import annotations

import bisect
import functools
import math
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from dispatcher.records import NodeRecord
from dispatcher.store import texts
from dispatcher.tally import TALLY
from dispatcher.vocabulary import FINAL_STATES, DecisionOutcome, Exclusion

if TYPE_CHECKING:  # (both import this module: their metrics are defined here)
    import redis

    from dispatcher.fleet import Fleet
    from dispatcher.jobs import Jobs
    from dispatcher.keys import Keys

#: The fleet's counters and histograms, in the order /metrics shows them.
FLEET_METRICS: list[Any] = []


class _Child:
    """One series of a fleet metric (``metric.labels(...)``)."""

    __slots__ = ("field", "buckets")

    def __init__(self, field: str, buckets: Sequence[float]) -> None:
        self.field = field
        self.buckets = buckets

    def inc(self, n: int = 1) -> None:
        TALLY.count(self.field, n)

    def observe(self, seconds: float) -> None:
        TALLY.observe(self.field, bisect.bisect_left(self.buckets, seconds), seconds)


class FleetCounter:
    """A counter of the whole fleet, written as prometheus-client's (``.labels(...).inc()``,
    ``.inc()``): counted here, summed in Redis under ``field`` (``field:<label values>``),
    shown by any web process. ``known`` label values are shown at 0 before they happen
    (an alert on a rate needs the series to exist)."""

    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *, field: str | None = None,
                 known: Sequence[Sequence[str]] = ()) -> None:
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.field = field or self.name.removeprefix("dispatcher_")
        # An unlabelled counter is shown from the start, as prometheus-client's is.
        self.known = [tuple(values) for values in known] or ([] if labelnames else [()])
        self.buckets: Sequence[float] = ()
        self._children: dict[tuple[str, ...], _Child] = {}
        FLEET_METRICS.append(self)

    def labels(self, *values: str) -> _Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, not {values}")
            child = self._children.setdefault(values, _Child(":".join((self.field, *values)), self.buckets))
        return child

    def inc(self, n: int = 1) -> None:
        self.labels().inc(n)

    def observe(self, seconds: float) -> None:
        self.labels().observe(seconds)

    def series(self, fields: dict[str, str]) -> dict[tuple[str, ...], str]:
        """The stored values of this metric's series, by label values."""
        found: dict[tuple[str, ...], str] = {}
        for field, value in fields.items():
            if self.labelnames:
                name, _, rest = field.partition(":")
                if name == self.field:
                    found[tuple(rest.split(":", len(self.labelnames) - 1))] = value
            elif field == self.field:
                found[()] = value
        return found


class FleetHistogram(FleetCounter):
    """A histogram of the whole fleet (``.observe(seconds)``): bucket counts and the sum
    summed in Redis, in ``Keys.stats_histograms()``."""

    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float]) -> None:
        super().__init__(name, documentation, labelnames)
        self.name = name
        self.buckets = tuple(buckets)


#: Latency buckets (seconds) from a millisecond to ten minutes.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_SCRIPT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

TRANSITIONS = FleetCounter("dispatcher_status_transitions_total", "Node status transitions.",
                           ["from_status", "to_status"])
HEARTBEATS = FleetCounter("dispatcher_heartbeats_total", "Heartbeats recorded, by health verdict.", ["healthy"])
RUNNING_JOBS_MISMATCHES = FleetCounter("dispatcher_running_jobs_mismatches_total",
                                       "Episodes of a node's running_jobs disagreeing with the jobs assigned to it "
                                       "for running_jobs_mismatch_heartbeats heartbeats in a row.")
DECISIONS = FleetCounter("dispatcher_dispatch_decisions_total", "Dispatch decisions, by outcome.", ["outcome"],
                         field="decisions", known=[[o] for o in (
                             DecisionOutcome.ASSIGNED, DecisionOutcome.WAITING, DecisionOutcome.FAILED)])
EXCLUSIONS = FleetCounter("dispatcher_exclusions_total", "Nodes excluded by dispatch decisions, by reason.",
                          ["reason"], field="excluded", known=[[reason] for reason in Exclusion])
JOBS_FINISHED = FleetCounter("dispatcher_jobs_finished_total", "Jobs that ended, by final state.", ["state"],
                             field="finished", known=[[state] for state in FINAL_STATES])
SUBMIT_TO_ASSIGN = FleetHistogram("dispatcher_job_submit_to_assign_seconds",
                                  "From submission to the first assignment to a node.", buckets=_LATENCY_BUCKETS)
ASSIGN_TO_RESULT = FleetHistogram("dispatcher_job_assign_to_result_seconds",
                                  "From the assignment of the last attempt to the node's result.",
                                  buckets=_LATENCY_BUCKETS)
SCRIPT_SECONDS = FleetHistogram("dispatcher_lua_script_seconds", "Round trip of each Lua script call.",
                                ["script"], buckets=_SCRIPT_BUCKETS)


class _SessionsGauge:
    """``dispatcher_web_sessions``, made on its first use: only a web worker makes it, so no
    other process writes a file for it in a multiprocess folder."""

    def set(self, sessions: int) -> None:
        _sessions_gauge().set(sessions)


#: The web process's own metrics, when it has no multiprocess folder (a test's in-process app).
_LOCAL = CollectorRegistry()


@functools.cache
def _sessions_gauge() -> Gauge:
    return Gauge("dispatcher_web_sessions", "Node sessions held by one web process (one series per process).",
                 multiprocess_mode="liveall", registry=_LOCAL)


SESSIONS = _SessionsGauge()


class FleetCollector:
    """The fleet's metrics, read from Redis at scrape time: the gauges, the counters and
    histograms every process adds to, and per-node series for at most
    ``metrics_node_series`` nodes."""

    def __init__(self, fleet: Fleet, jobs: Jobs) -> None:
        self.fleet = fleet
        self.jobs = jobs

    def collect(self) -> Iterator[Metric]:
        client, keys = self.jobs.client, self.jobs.keys
        nodes = GaugeMetricFamily("dispatcher_nodes", "Known nodes, by status.", labels=["status"])
        for status, count in self.fleet.counts_by_status().items():
            nodes.add_metric([status], count)
        yield nodes
        yield GaugeMetricFamily("dispatcher_jobs_waiting", "Jobs waiting for an eligible node.",
                                value=client.zcard(keys.waiting()))
        from dispatcher.completions import unapplied  # (it imports the job code, which imports this module)

        yield GaugeMetricFamily("dispatcher_results_unapplied",
                                "Node results handed on by a web process that no worker has applied yet.",
                                value=unapplied(client, keys.results()))
        scan = self.fleet.last_scan()
        yield GaugeMetricFamily("dispatcher_partition_suspected",
                                "1 while the last scan found too many nodes silent at once.",
                                value=scan.get("suspected_partition", 0))
        yield GaugeMetricFamily("dispatcher_partition_deferred_nodes",
                                "Silent nodes the last scan left for later runs.", value=scan.get("deferred", 0))
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(keys.stats())
        pipe.hgetall(keys.stats_histograms())
        counters, histograms = pipe.execute()
        for metric in FLEET_METRICS:
            yield (_histogram if metric.kind == "histogram" else _counter)(metric, counters, histograms)
        limit = self.fleet.settings.metrics_node_series
        if limit:
            yield from node_series(client, keys, limit)


def _counter(metric: FleetCounter, counters: dict[str, str], _histograms: dict[str, str]) -> Metric:
    family = CounterMetricFamily(metric.name, metric.documentation, labels=metric.labelnames)
    values = {**{known: "0" for known in metric.known}, **metric.series(counters)}
    for labels, value in sorted(values.items()):
        family.add_metric(list(labels), int(value))
    return family


def _histogram(metric: FleetCounter, _counters: dict[str, str], histograms: dict[str, str]) -> Metric:
    family = HistogramMetricFamily(metric.name, metric.documentation, labels=metric.labelnames)
    by_series: dict[tuple[str, ...], dict[str, str]] = {}
    for field, value in histograms.items():
        series, _, bucket = field.rpartition("|")
        for labels, _value in metric.series({series: value}).items():
            by_series.setdefault(labels, {})[bucket] = value
    for labels, stored in sorted(by_series.items()):
        running, buckets = 0, []
        for i, upper in enumerate((*metric.buckets, float("inf"))):
            running += int(stored.get(str(i), 0))
            buckets.append(("+Inf" if upper == float("inf") else repr(float(upper)), running))
        family.add_metric(list(labels), buckets, float(stored.get("sum", 0)))
    return family


#: Fields of a node record the per-node series read.
_NODE_FIELDS = ("status", "max_concurrent_jobs", *(f"finished_{state}" for state in FINAL_STATES))


def _sample(value: int) -> float:
    """A stored integer as a sample: one past a float's range (an operator's HSET) is infinite."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def node_series(client: redis.Redis, keys: Keys, limit: int) -> Iterator[Metric]:
    """Series per node for the first ``limit`` nodes in id order: its status, its slots
    used and offered, its jobs finished by state; and how many nodes were left out."""
    node_ids = texts(client.zrange(keys.nodes(), 0, limit - 1))
    status = GaugeMetricFamily("dispatcher_node_status", "1 for each node's current status.",
                               labels=["node_id", "status"])
    used = GaugeMetricFamily("dispatcher_node_slots_used", "Jobs assigned to the node.", labels=["node_id"])
    slots = GaugeMetricFamily("dispatcher_node_slots", "The node's max_concurrent_jobs.", labels=["node_id"])
    finished = CounterMetricFamily("dispatcher_node_jobs_finished", "Jobs that ended on the node, by final state.",
                                   labels=["node_id", "state"])
    for start in range(0, len(node_ids), 500):
        chunk = node_ids[start:start + 500]
        pipe = client.pipeline(transaction=False)
        for node_id in chunk:
            pipe.hmget(keys.node(node_id), _NODE_FIELDS)
            pipe.hlen(keys.assigned(node_id))
        replies = pipe.execute()
        for i, node_id in enumerate(chunk):
            node = NodeRecord.from_hash(dict(zip(_NODE_FIELDS, replies[2 * i], strict=True)))
            assigned = replies[2 * i + 1]
            if node.status_text is None:
                continue  # deleted since the id was read
            status.add_metric([node_id, node.status_text], 1)
            used.add_metric([node_id], assigned)
            slots.add_metric([node_id], _sample(node.max_concurrent_jobs or 0))
            for state in FINAL_STATES:
                finished.add_metric([node_id, state], _sample(node.finished[state]))
    yield from (status, used, slots, finished)
    yield GaugeMetricFamily("dispatcher_node_series_omitted",
                            "Nodes left out of the per-node series (past metrics_node_series).",
                            value=max(0, client.zcard(keys.nodes()) - len(node_ids)))


def exposition(fleet: Fleet, jobs: Jobs) -> bytes:
    """The text of ``/metrics``: the fleet's metrics from Redis, then the web process's own
    (its workers' session counts, from its own multiprocess folder when it has one)."""
    fleet_registry = CollectorRegistry()
    fleet_registry.register(FleetCollector(fleet, jobs))
    local = _LOCAL
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        local = CollectorRegistry()
        MultiProcessCollector(local)
    return generate_latest(fleet_registry) + generate_latest(local)
