"""Celery's configuration, taken from the dispatcher's settings (read once).

Workers and beat load it through ``dispatcher.celery_app``.
"""

from __future__ import annotations

import ssl

from kombu import Queue

from dispatcher.keys import CELERY_RESULT_EXPIRES_S
from dispatcher.settings import get_settings

_settings = get_settings()

broker_url = _settings.redis_url
result_backend = _settings.redis_url
if _settings.redis_url.startswith("rediss://"):
    _tls = {"ssl_cert_reqs": ssl.CERT_REQUIRED if _settings.redis_tls_verify else ssl.CERT_NONE}
    broker_use_ssl = _tls
    redis_backend_use_ssl = _tls

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
# Off: it would keep every submission's kwargs (payloads included) beside its result for
# a day, a refused one too. Clients read a job's states and result, not its arguments.
result_extended = False
# The job scripts write the results of jobs themselves (dispatcher/keys.py): the same expiry.
result_expires = CELERY_RESULT_EXPIRES_S
# Sized on purpose, by the one setting that sizes every pool of a process (redis-py 8 refuses
# to go past its pool size): the result backend's and each broker channel's (transport
# options below).
redis_max_connections = _settings.redis_max_connections
# Celery's broker pool opens its connections as they are needed (the dispatcher's processes
# use one: their tasks and events go through one channel, dispatcher/publish.py), so this is
# a ceiling, not a size. Celery's default stays: a broadcast (Flower inspects 8 ways at once)
# holds one connection while it takes another, so a ceiling under about 10 deadlocks Flower.
broker_pool_limit = 10
broker_connection_retry_on_startup = True
# A managed Redis restarts for maintenance: keep reconnecting however long it takes (a
# worker that gave up would sit idle until its platform restarted it).
broker_connection_max_retries = None
# Celery 6's default: a task running when the broker connection is lost is cancelled
# and comes back (ours are short and idempotent) instead of ending with a failed ack.
worker_cancel_long_running_tasks_on_connection_loss = True
# Every dispatcher task ends within a second, so a message a killed worker held comes
# back after a minute (Celery's default is an hour), from a sweep every 10 s. The job's
# own truth lives in our records; this bounds only the moment between a submit_job being
# received and the job being recorded. (kombu sweeps every unacknowledged message of the
# database: give the dispatcher a Redis database of its own, no other app's workers.)
broker_transport_options = {
    "max_connections": _settings.redis_max_connections,
    "visibility_timeout": 60,
    "unacked_restore_interval": 10,
    "unacked_restore_throttle": 1,
    # The internal queue is read first: completions and the scan never wait behind a
    # flood of submissions (kombu's BRPOP takes the first non-empty queue it names).
    "queue_order_strategy": "priority",
}
#: Passes over waiting jobs and the scan: what keeps running jobs moving.
INTERNAL_QUEUE = "dispatcher.internal"
task_default_queue = "celery"
task_queues = (Queue(INTERNAL_QUEUE), *(Queue(name) for name in _settings.priority_queues), Queue("celery"))
task_routes = {name: {"queue": INTERNAL_QUEUE} for name in ("dispatcher.dispatch_waiting", "dispatcher.scan_nodes")}

# Our tasks are short and idempotent; the truth about jobs lives in our own records.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 4
worker_hijack_root_logger = False
worker_send_task_events = True
# Off: a task-sent event cannot be turned off per task, and the internal tasks that beat,
# web and the workers send (the scan, passes over waiting jobs) would fill Flower.
task_send_sent_event = False
task_track_started = False

beat_schedule = {
    "scan-nodes": {
        "task": "dispatcher.scan_nodes",
        "schedule": _settings.periodic_scan_interval_seconds,
        "options": {"expires": _settings.periodic_scan_interval_seconds},
    },
}
