"""The dispatcher's Celery tasks. ``dispatcher.submit_job``, ``cancel_job``,
``drain_node``, ``undrain_node``, ``cordon_node`` and ``uncordon_node`` are the
contract; the others are internal.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from celery import Task
from celery.worker.request import Request

from dispatcher.celery_app import app, core
from dispatcher.errors import InvalidJob
from dispatcher.jobs import Jobs
from dispatcher.jobspec import describe_submission
from dispatcher.recovery import Recovery
from dispatcher.registry import Registry


def registry() -> Registry:
    """The process's registry (its core's, built on first use: after a prefork worker forks)."""
    return core().registry


def jobs() -> Jobs:
    return core().jobs


class SubmissionRequest(Request):
    """A submission as the worker sees it, whose payload never reaches a log line or a
    task event: Celery logs and sends each received task's kwargs (``kwargsrepr``).

    Its return value is never stored, even when the client's message asks for it
    (``send_task(..., ignore_result=False)``): Celery's SUCCESS with None would
    overwrite the node's output, which may already be there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ignore_result = self._request_dict["ignore_result"] = True
        self._argsrepr = self._request_dict["argsrepr"] = "()"
        self._kwargsrepr = self._request_dict["kwargsrepr"] = describe_submission(self.kwargs)


# The task stores no result and sends no events of its own: the job's scripts write its
# states under this task's id as they happen, and the publisher tells Flower the job's
# story (received here, started and ended where the node's frames arrive), every event
# in the name of this worker. Only a refused
# submission's error is stored, by Celery, as the task's failure.
@app.task(name="dispatcher.submit_job", bind=True, Request=SubmissionRequest, ignore_result=True,
          store_errors_even_if_ignored=True, send_events=False)
def submit_job(self: Task, **fields: Any) -> None:
    """Record the job and hand it to a node (or let it wait for one)."""
    job_id = self.request.id
    publisher = jobs().publisher
    worker = self.request.hostname or ""
    publisher.received(job_id, self.request.kwargsrepr, worker)
    try:
        jobs().submit(job_id, fields, worker)
    except InvalidJob as exc:
        publisher.refused(job_id, exc, worker)
        raise


@app.task(name="dispatcher.cancel_job")
def cancel_job(job_id: str, reason: str = "cancelled by the client") -> str:
    """Returns "cancelled", or the state of a job that was already over."""
    return jobs().cancel(job_id, reason)


@app.task(name="dispatcher.drain_node")
def drain_node(node_id: str, deadline_seconds: float | None = None, reason: str = "",
               requested_by: str = "a dispatcher.drain_node task") -> dict[str, Any]:
    """Drain a ready or degraded node: no new jobs; offline once its jobs end, or at the deadline."""
    outcome = registry().drain(node_id, requested_by, reason or "no reason given", deadline_seconds)
    return {"node_id": node_id, "status": outcome.status, "jobs_left": outcome.jobs_left}


@app.task(name="dispatcher.undrain_node")
def undrain_node(node_id: str, requested_by: str = "a dispatcher.undrain_node task") -> str:
    """End a drain; returns the node's status now."""
    status = registry().undrain(node_id, requested_by)
    jobs().request_kick()
    return status


@app.task(name="dispatcher.cordon_node")
def cordon_node(node_id: str, reason: str = "", requested_by: str = "a dispatcher.cordon_node task") -> dict[str, Any]:
    """Keep a node from new jobs; it keeps its status, its session and the jobs it has."""
    status = registry().cordon(node_id, requested_by, reason or "no reason given")
    return {"node_id": node_id, "status": status, "cordoned": True}


@app.task(name="dispatcher.uncordon_node")
def uncordon_node(node_id: str, requested_by: str = "a dispatcher.uncordon_node task") -> dict[str, Any]:
    """End a cordon: the node takes new jobs again (once ready)."""
    status = registry().uncordon(node_id, requested_by)
    jobs().request_kick()
    return {"node_id": node_id, "status": status, "cordoned": False}


# Internal tasks send no events: Flower lists the jobs and the contract's tasks.
@app.task(name="dispatcher.dispatch_waiting", ignore_result=True, send_events=False)
def dispatch_waiting() -> int:
    return jobs().dispatch_waiting()


@app.task(name="dispatcher.scan_nodes", ignore_result=True, send_events=False)
def scan_nodes(now_ms: int | None = None) -> dict[str, Any]:
    """The periodic scan: node timeouts, then the jobs' deadlines and anything left half-way."""
    nodes = registry().scan(now_ms)
    budget = core().settings.partition_offline_per_scan if nodes.suspected_partition else None
    return {"nodes": asdict(nodes), "jobs": asdict(Recovery(jobs()).scan(now_ms, lost_budget=budget))}
