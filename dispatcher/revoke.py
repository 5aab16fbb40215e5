"""Celery's revoke is the dispatcher's cancel.

``AsyncResult.revoke()``, ``celery control revoke`` and Flower's revoke and
terminate buttons broadcast Celery's ``revoke`` control command to every
worker. Celery alone would only stop a submission that no worker has run yet;
a job lives on past its submission task, on a node. So every worker answers
the command by cancelling the job as ``dispatcher.cancel_job`` does (the node
gets ``job_cancel``, the slot frees, the state is ``REVOKED`` with the reason),
then lets Celery do its own part, which leaves a final state alone. Every
worker hears the broadcast; the cancel script makes the second one a no-op.

A revoke that comes before any worker has the submission is Celery's to
mark; ``submit_job.lua`` then refuses the submission when it arrives.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.utils.functional import maybe_list
from celery.worker import control

from dispatcher.errors import DispatcherError, UnknownJob
from dispatcher.jobspec import valid_job_id
from dispatcher.logs import log_event

log = logging.getLogger("dispatcher.revoke")

_celery_revoke = control.Panel.data["revoke"]


def _jobs() -> Any:
    # The worker's main process runs control commands: its core's jobs, which the
    # completion loop uses too (one publisher, one job events connection).
    from dispatcher.celery_app import core

    return core().jobs


@control.control_command(variadic="task_id", signature="[id1 [id2 [... [idN]]]]")
def revoke(state: Any, task_id: Any, terminate: bool = False, signal: str | None = None, **kwargs: Any) -> Any:
    """Revoke tasks by id: a job is cancelled (on its node too), then Celery revokes the task."""
    how = f"terminate, signal {signal or 'TERM'}" if terminate else "revoke"
    jobs, others = [], []
    for job_id in set(maybe_list(task_id) or []):
        if not isinstance(job_id, str) or not valid_job_id(job_id):
            others.append(job_id)  # no job has such an id
            continue
        try:
            outcome = _jobs().cancel(job_id, f"revoked through Celery ({how})")
        except UnknownJob:
            others.append(job_id)  # not (yet) a job: Celery's own revoke covers it
            continue
        except DispatcherError as exc:  # (StoreError among them)
            log_event(log, "revoke_failed", logging.WARNING, job_id=str(job_id)[:128], error=str(exc)[:200])
            others.append(job_id)
            continue
        jobs.append(job_id)
        log_event(log, "job_revoked", job_id=job_id, outcome=outcome, terminate=terminate)
    if not jobs:
        return _celery_revoke(state, task_id, terminate=terminate, signal=signal, **kwargs)
    # A job's work is on its node, stopped by the cancel: terminating the pool process that may
    # still be finishing its submission would stop nothing of the job, and lose what that
    # process had not sent yet (its jobs' buffered task events, for Flower).
    replies = [_celery_revoke(state, jobs, terminate=False, **kwargs)]
    if others:
        replies.append(_celery_revoke(state, others, terminate=terminate, signal=signal, **kwargs))
    return {"ok": "; ".join(str(reply.get("ok", reply)) for reply in replies)}
