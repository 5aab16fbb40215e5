"""Every Redis key and channel name of the dispatcher, and nothing else.

All names share one prefix (default ``{dispatcher}``): it keeps them apart from
Celery's and kombu's keys, and its braces make it a Redis Cluster hash tag, so
every key a script touches lives in one slot.
"""

from __future__ import annotations

from collections.abc import Iterable

from dispatcher.vocabulary import FINAL_STATES, NodeStatus

#: The keys every node script receives first, in this order. The script loader
#: turns this list into the Lua table ``K`` (``K.node``, ``K.ready`` ...), so
#: Python and Lua cannot disagree on positions.
NODE_BUNDLE = (
    "node",
    "nodes",
    "liveness",
    "warmup",
    *NodeStatus,  # the status sets, in the statuses' order
    "queue",
    "node_transitions",
    "transitions",
    "gpu_index",
    "public_index",
    "resources_index",
    "capacity_index",
    "assigned",
    "cancels",
    "drains",
    "waiting",
    "lost",
    "offline_since",
)

#: The workers' consumer group on the results stream (``Keys.results``).
RESULTS_GROUP = "completers"

#: Seconds Celery's backend keeps a task's result (``result_expires``; the job scripts write it).
CELERY_RESULT_EXPIRES_S = 24 * 3600

#: The keys every job script receives (after the node bundle, when it has one).
JOB_BUNDLE = (
    "job",
    "waiting",
    "waiting_class",
    "waiting_classes",
    "waiting_needs",
    "deadlines",
    "result",
    "capacity_index",
    "liveness",
    *(f"finished_{state}" for state in FINAL_STATES),
)


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str = "{dispatcher}") -> None:
        self.prefix = prefix

    # --- nodes -------------------------------------------------------------
    def node(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"

    def node_key_parts(self) -> dict[str, str]:
        """How the dispatch scripts name a candidate's keys: ``head`` + node id is its hash,
        plus ``assigned`` or ``queue`` the others (as ``node``, ``assigned`` and ``queue`` here)."""
        return {"head": self.node(""), "assigned": self.assigned("")[len(self.node("")):],
                "queue": self.queue("")[len(self.node("")):]}

    def nodes(self) -> str:
        """Sorted set of every known node id, all scored 0 (so read in id order, by pages)."""
        return f"{self.prefix}:nodes"

    def liveness(self) -> str:
        """Sorted set: node id -> last time seen (ms), for nodes not offline."""
        return f"{self.prefix}:liveness"

    def warmup(self) -> str:
        """Sorted set: node id -> time it entered ``registering`` (ms)."""
        return f"{self.prefix}:warmup"

    def status_set(self, status: str) -> str:
        return f"{self.prefix}:status:{status}"

    def queue(self, node_id: str) -> str:
        """List of frames waiting to be sent to the node's session."""
        return f"{self.node(node_id)}:queue"

    def node_transitions(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}:transitions"

    def transitions(self) -> str:
        """Capped list of the fleet's recent status transitions."""
        return f"{self.prefix}:transitions"

    def assigned(self, node_id: str) -> str:
        """Hash: job id -> the ``job_assign`` frame, for jobs assigned to the node."""
        return f"{self.node(node_id)}:assigned"

    def cancels(self, node_id: str) -> str:
        """Sorted set: ``job_cancel`` frames sent to the node -> until when (ms)
        they are sent again should the node resume (frames queued for a
        session are dropped when the node registers again)."""
        return f"{self.prefix}:node:{node_id}:cancels"

    def offline_since(self) -> str:
        """Sorted set: offline node id -> when it is next due for the scan's
        retention check (ms): when it went offline, or was last seen."""
        return f"{self.prefix}:offline_since"

    def drains(self) -> str:
        """Sorted set: draining node id -> drain deadline (ms)."""
        return f"{self.prefix}:drains"

    def cordoned(self) -> str:
        """Set of the cordoned node ids (none of them is in the capacity index)."""
        return f"{self.prefix}:cordoned"

    # --- dispatch indexes --------------------------------------------------
    def gpu_index(self) -> str:
        return f"{self.prefix}:idx:gpu"

    def public_index(self) -> str:
        return f"{self.prefix}:idx:public"

    def resources_index(self) -> str:
        """Nodes whose cpu, gpu and mem usage are all below the threshold."""
        return f"{self.prefix}:idx:resources"

    def capacity_index(self) -> str:
        """Sorted set: ready node with a free slot -> its load (assigned / max_concurrent_jobs),
        then when it last got or freed a slot in the last digits (equally loaded nodes take turns)."""
        return f"{self.prefix}:idx:capacity"

    def model_index(self, model_id: str) -> str:
        """Nodes reporting the model ``ready``."""
        return f"{self.prefix}:idx:model:{model_id}"

    def label_index(self, key: str, value: str) -> str:
        return f"{self.prefix}:idx:label:{key}={value}"

    # --- jobs --------------------------------------------------------------
    def job(self, job_id: str) -> str:
        """Hash: the job's spec, state, current attempt, and its ended attempts (field
        ``attempts``, JSON: node, assigned, acked, ended, outcome; oldest first)."""
        return f"{self.prefix}:job:{job_id}"

    def waiting(self) -> str:
        """Sorted set of waiting job ids, highest priority first, then oldest."""
        return f"{self.prefix}:waiting"

    def waiting_class(self, needs_class: str | None) -> str:
        """Sorted set of the waiting jobs of one kind of needs, in ``waiting``'s order. A
        caller that never moves the job in or out of waiting (an ack, a result) passes None:
        the key then names no set, and those scripts never touch it."""
        return f"{self.prefix}:waiting:{needs_class or '-'}"

    def waiting_classes(self) -> str:
        """Sorted set: kind of needs -> the score of its first waiting job. A pass over the
        waiting jobs walks kinds, not jobs: one that no node can take costs one try."""
        return f"{self.prefix}:waiting_classes"

    def waiting_needs(self) -> str:
        """Hash: kind of needs -> its needs as JSON, while jobs of that kind wait."""
        return f"{self.prefix}:waiting_needs"

    def deadlines(self) -> str:
        """Sorted set: job id -> when its current phase times out (ms): the
        dispatch timeout while waiting, the attempt's timeout once assigned."""
        return f"{self.prefix}:deadlines"

    def finished(self, state: str) -> str:
        """Sorted set: job id -> when it was submitted (ms), for the jobs that ended in ``state``
        (one of FINAL_STATES); the scan trims it to the records' retention."""
        return f"{self.prefix}:finished:{state}"

    def results(self) -> str:
        """Stream of the nodes' results as the web processes received them, until a worker
        applies them (dispatcher/completions.py): job_id, node_id, attempt, kind, meta, output."""
        return f"{self.prefix}:results"

    def kick(self) -> str:
        """Set while a pass over the waiting jobs is queued (so events queue one, not many)."""
        return f"{self.prefix}:kick"

    def lost(self) -> str:
        """Sorted set: offline node id -> when its jobs are re-dispatched (ms)."""
        return f"{self.prefix}:lost"

    def scan_state(self) -> str:
        """Hash: what the last periodic scan did (time, expired, partition suspected)."""
        return f"{self.prefix}:scan"

    def stats(self) -> str:
        """Hash of the fleet's counters: dispatch decisions, exclusions per reason, jobs
        finished, heartbeats, transitions (dispatcher/tally.py)."""
        return f"{self.prefix}:stats"

    def stats_histograms(self) -> str:
        """Hash of the fleet's latency histograms: ``<name>|<bucket index>`` -> count and
        ``<name>|sum`` -> seconds (dispatcher/tally.py)."""
        return f"{self.prefix}:stats:histograms"

    def stats_examples(self) -> str:
        """Hash: exclusion reason -> JSON list of recent example node ids."""
        return f"{self.prefix}:stats:examples"

    # --- channels (not keys) -----------------------------------------------
    def wake_channel(self) -> str:
        """Pub/sub channel carrying node ids whose queue has new frames."""
        return f"{self.prefix}:wake"


    # --- bundles -----------------------------------------------------------
    def node_bundle(self, node_id: str) -> list[str]:
        """The keys of ``NODE_BUNDLE`` for one node, in order."""
        by_name: dict[str, str] = {
            "node": self.node(node_id),
            "nodes": self.nodes(),
            "liveness": self.liveness(),
            "warmup": self.warmup(),
            **{status: self.status_set(status) for status in NodeStatus},
            "queue": self.queue(node_id),
            "node_transitions": self.node_transitions(node_id),
            "transitions": self.transitions(),
            "gpu_index": self.gpu_index(),
            "public_index": self.public_index(),
            "resources_index": self.resources_index(),
            "capacity_index": self.capacity_index(),
            "assigned": self.assigned(node_id),
            "cancels": self.cancels(node_id),
            "drains": self.drains(),
            "waiting": self.waiting(),
            "lost": self.lost(),
            "offline_since": self.offline_since(),
        }
        return [by_name[name] for name in NODE_BUNDLE]

    def job_bundle(self, job_id: str, needs_class: str | None) -> list[str]:
        """The keys of ``JOB_BUNDLE`` for one job (of the given kind of needs), in order."""
        by_name = {
            "job": self.job(job_id),
            "waiting": self.waiting(),
            "waiting_class": self.waiting_class(needs_class),
            "waiting_classes": self.waiting_classes(),
            "waiting_needs": self.waiting_needs(),
            "deadlines": self.deadlines(),
            "result": self.celery_result(job_id),
            "capacity_index": self.capacity_index(),
            "liveness": self.liveness(),
            **{f"finished_{state}": self.finished(state) for state in FINAL_STATES},
        }
        return [by_name[name] for name in JOB_BUNDLE]

    def celery_result(self, task_id: str) -> str:
        """Celery's result key of a task: its backend's, not under our prefix. The job scripts
        write it with the job's state, so the two always agree (Celery and kombu need one
        Redis, not a cluster, so a script may touch it beside our keys)."""
        return f"celery-task-meta-{task_id}"

    def model_indexes(self, model_ids: Iterable[str]) -> list[str]:
        return [self.model_index(m) for m in model_ids]

    def label_indexes(self, labels: Iterable[tuple[str, str]]) -> list[str]:
        return [self.label_index(k, v) for k, v in labels]
