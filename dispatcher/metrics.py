"""Prometheus metrics of every dispatcher process.

Counters and histograms live in the process that counts them. With
``PROMETHEUS_MULTIPROC_DIR`` set (prometheus-client's multiprocess mode), the
gunicorn workers, Celery's pool processes and beat on one host all write
there, and the web process's ``/metrics`` adds them up. The fleet's gauges
(nodes by status, waiting jobs, the partition breaker) are read from Redis
when scraped, so they are the same whichever web process answers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

#: Latency buckets (seconds) from a millisecond to ten minutes.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_SCRIPT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

TRANSITIONS = Counter("dispatcher_status_transitions_total", "Node status transitions.",
                      ["from_status", "to_status"])
HEARTBEATS = Counter("dispatcher_heartbeats_total", "Heartbeats recorded, by health verdict.", ["healthy"])
DECISIONS = Counter("dispatcher_dispatch_decisions_total", "Dispatch decisions, by outcome.", ["outcome"])
EXCLUSIONS = Counter("dispatcher_exclusions_total", "Nodes excluded by dispatch decisions, by reason.", ["reason"])
JOBS_FINISHED = Counter("dispatcher_jobs_finished_total", "Jobs that ended, by final state.", ["state"])
SUBMIT_TO_ASSIGN = Histogram("dispatcher_job_submit_to_assign_seconds",
                             "From submission to the first assignment to a node.", buckets=_LATENCY_BUCKETS)
ASSIGN_TO_RESULT = Histogram("dispatcher_job_assign_to_result_seconds",
                             "From the assignment of the last attempt to the node's result.",
                             buckets=_LATENCY_BUCKETS)
SCRIPT_SECONDS = Histogram("dispatcher_lua_script_seconds", "Round trip of each Lua script call.", ["script"],
                           buckets=_SCRIPT_BUCKETS)
SESSIONS = Gauge("dispatcher_web_sessions", "Node sessions held by one web process (one series per process).",
                 multiprocess_mode="liveall")


class FleetCollector:
    """Gauges read from Redis at scrape time."""

    def __init__(self, fleet: Any, jobs: Any) -> None:
        self.fleet = fleet
        self.jobs = jobs

    def collect(self) -> Iterator[Metric]:
        nodes = GaugeMetricFamily("dispatcher_nodes", "Known nodes, by status.", labels=["status"])
        for status, count in self.fleet.counts_by_status().items():
            nodes.add_metric([status], count)
        yield nodes
        yield GaugeMetricFamily("dispatcher_jobs_waiting", "Jobs waiting for an eligible node.",
                                value=self.jobs.client.zcard(self.jobs.keys.waiting()))
        from dispatcher.completions import unapplied  # (it imports the job code, which imports this module)

        yield GaugeMetricFamily("dispatcher_results_unapplied",
                                "Node results handed on by a web process that no worker has applied yet.",
                                value=unapplied(self.jobs.client, self.jobs.keys.results()))
        scan = self.fleet.last_scan()
        yield GaugeMetricFamily("dispatcher_partition_suspected",
                                "1 while the last scan found too many nodes silent at once.",
                                value=scan.get("suspected_partition", 0))
        yield GaugeMetricFamily("dispatcher_partition_deferred_nodes",
                                "Silent nodes the last scan left for later runs.", value=scan.get("deferred", 0))


def exposition(fleet: Any, jobs: Any) -> bytes:
    """The text of ``/metrics``: this host's processes (or this process) plus the fleet."""
    counted = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(counted)
        text = generate_latest(counted)
    else:
        from prometheus_client import REGISTRY

        text = generate_latest(REGISTRY)
    fleet_registry = CollectorRegistry()
    fleet_registry.register(FleetCollector(fleet, jobs))
    return text + generate_latest(fleet_registry)
