"""Baseline for bench/jobs.py: a plain Celery task that does nothing but say when it started."""

import os
import time

from celery import Celery

app = Celery("bench", broker=os.environ["REDIS_URL"], backend=os.environ["REDIS_URL"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                worker_prefetch_multiplier=4, task_acks_late=True, task_default_queue="bench")


@app.task(name="bench.noop")
def noop() -> float:
    return time.time()
