"""Job handlers for demos and tests. A real node names its own (``module:function``).

A handler receives the job (``job_id``, ``attempt``, ``job_type``, ``payload``,
``required_models``, ``timeout_seconds``) and a ``JobContext`` (report
progress, see cancellation) and returns the job's output, any JSON value. A
raised ``JobFailed`` carries an error code, whether a retry may help and whether
the node is to blame (``node_fault``); any other exception is reported as
``HANDLER_ERROR``, retryable, unless it is an out-of-memory or CUDA error
(``OUT_OF_MEMORY``, ``CUDA_ERROR``: the node's fault). An output the contract refuses
(NaN or Infinity, nested deeper than 64 levels) or JSON cannot carry (an object of the
handler's own) fails the job with ``INVALID_OUTPUT``, not retryable.
"""

from __future__ import annotations

import time
from typing import Any

from dispatcher.agent.runner import JobContext, JobFailed


def echo(job: dict[str, Any], ctx: JobContext) -> Any:
    """Returns the payload unchanged."""
    return job["payload"]


def sleep(job: dict[str, Any], ctx: JobContext) -> Any:
    """Works for ``payload.seconds`` (default 1), reporting progress; honours cancellation."""
    seconds = float(job["payload"].get("seconds", 1))
    steps = max(1, int(seconds / 0.1))
    for step in range(steps):
        if ctx.cancelled.wait(seconds / steps):
            raise JobFailed("CANCELLED", "cancelled", retryable=False)
        ctx.progress((step + 1) / steps, f"step {step + 1}/{steps}")
    return {"slept_seconds": seconds, "payload": job["payload"]}


def asr(job: dict[str, Any], ctx: JobContext) -> Any:
    """A stand-in for speech recognition (the README's example job): no model runs, the
    transcript says so."""
    ctx.progress(1.0, "transcribed")
    return {"text": f"(demo transcript of {job['payload'].get('audio_url', 'no audio_url')})",
            "model": (job.get("required_models") or ["none"])[0]}


def fail(job: dict[str, Any], ctx: JobContext) -> Any:
    """Fails with ``payload.code`` (default MODEL_CRASHED), retryable unless ``payload.retryable`` is false,
    the node's fault when ``payload.node_fault`` says so (by default, as the code says: ``NODE_FAULT_CODES``)."""
    payload = job["payload"]
    raise JobFailed(payload.get("code", "MODEL_CRASHED"), payload.get("message", "the model crashed"),
                    retryable=payload.get("retryable", True), node_fault=payload.get("node_fault"))


def demo(job: dict[str, Any], ctx: JobContext) -> Any:
    """The demo node's handler: chooses by ``job_type`` (echo, sleep, asr, fail)."""
    handlers = {"echo": echo, "sleep": sleep, "asr": asr, "fail": fail}
    handler = handlers.get(job["job_type"])
    if handler is None:
        raise JobFailed("UNSUPPORTED_JOB_TYPE", f"this demo node runs {', '.join(handlers)}", retryable=False)
    started = time.monotonic()
    output = handler(job, ctx)
    if isinstance(output, dict) and job["job_type"] != "echo":
        output = {**output, "handled_in_s": round(time.monotonic() - started, 3)}
    return output
