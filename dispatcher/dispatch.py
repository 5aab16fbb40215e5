"""Dispatch: the atomic search-filter-and-assign script, and the explanation of
a job that finds no node.

Cost per attempt grows with the candidates, not with the fleet: the script
reads the least loaded ready nodes with a free slot a page at a time, keeps
those in every index the job needs (public, each selector label, GPU, each
required model, resources) and heard from in time, re-checks every step of
the filter on them and assigns, all in one atomic step: what it saw cannot
change before it acts, so a job is never parked while capacity goes unused.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from dispatcher.clock import Clock
from dispatcher.filter import NODE_FIELDS, JobNeeds, evaluate, explanation, first_failure, summarize
from dispatcher.keys import Keys
from dispatcher.logs import log_event
from dispatcher.metrics import DECISIONS, EXCLUSIONS, SUBMIT_TO_ASSIGN
from dispatcher.records import NodeRecord
from dispatcher.scripts import Assigned, NotWaiting, Scripts, Search
from dispatcher.settings import Settings
from dispatcher.store import text_hash, texts
from dispatcher.tally import TALLY
from dispatcher.vocabulary import DecisionOutcome, Exclusion, NodeStatus

log = logging.getLogger("dispatcher.dispatch")

#: Nodes the candidate search looks at in load order before it intersects the indexes instead.
_CANDIDATE_BUDGET = 64
#: Nodes looked at, at most, for examples of why a job waits.
_EXAMPLES_BUDGET = 512
#: Seconds a yes of could_ever_take is kept.
_EVER_KEEP_S = 1.0
#: Nodes read per pipeline when explaining a failure over the whole fleet.
_WALK_CHUNK = 500


@dataclass
class Decision:
    job_id: str
    outcome: DecisionOutcome
    node_id: str | None = None
    attempt: int | None = None
    #: {"counts": {reason: n}, "examples": {reason: [node ids]}}
    exclusions: dict[str, Any] = field(default_factory=dict)
    eligible: int | None = None
    total: int | None = None
    #: How long the job waited for this assignment (from submission, on a first attempt).
    waited_ms: int | None = None
    #: A waiting decision's Celery WAITING meta, and the Celery worker named in the job's events.
    meta: dict[str, Any] | None = None
    worker: str = ""

    def summary(self) -> str:
        return summarize(self.eligible or 0, self.total or 0, self.exclusions.get("counts", {}),
                         self.exclusions.get("examples", {}))


class Dispatcher:
    def __init__(self, client: redis.Redis, settings: Settings, scripts: Scripts, clock: Clock) -> None:
        self.client = client
        self.settings = settings
        self.scripts = scripts
        self.keys: Keys = scripts.keys
        self.clock = clock
        # Decisions are counted in the process's tally, which adds them to Redis in sums.
        TALLY.bind(client, scripts)
        #: kind of needs -> when a registered node was last found that could take it
        self._ever: dict[str, float] = {}

    def _stages(self, needs: JobNeeds) -> list[tuple[str, list[str], bool]]:
        """The filter's indexed steps, in order: (reason, the index keys that step adds, whether
        its key lists the nodes that fail it). The cordoned nodes are such a key: the capacity
        index, the next step's, holds none of them (lua/note_waiting.lua counts on it)."""
        k = self.keys
        stages: list[tuple[str, list[str], bool]] = [
            (Exclusion.STATUS_NOT_READY, [k.status_set(NodeStatus.READY)], False)]
        if needs.public:
            stages.append((Exclusion.NOT_IN_PUBLIC_POOL, [k.public_index()], False))
        if needs.node_selector:
            stages.append((Exclusion.NODE_SELECTOR_MISMATCH, k.label_indexes(needs.node_selector), False))
        if needs.require_gpu:
            stages.append((Exclusion.GPU_UNAVAILABLE, [k.gpu_index()], False))
        if needs.required_models:
            stages.append((Exclusion.MODEL_NOT_AVAILABLE, k.model_indexes(needs.required_models), False))
        stages.append((Exclusion.NODE_CORDONED, [k.cordoned()], True))
        stages.append((Exclusion.CAPACITY_EXCEEDED, [k.capacity_index()], False))
        stages.append((Exclusion.RESOURCE_THRESHOLD_EXCEEDED, [k.resources_index()], False))
        return stages

    def note_waiting(self, job_id: str, needs: JobNeeds) -> Decision | None:
        """Record why a waiting job waits, where a Celery client reads it (its WAITING state):
        counts by reason from the indexes, in one script, never a node walk, and up to K
        examples per reason from a bounded look at the nodes. Exact but for liveness: a ready
        node silent past the timeout counts as eligible until the scan expires it. None when
        the job no longer waits."""
        noted = self.scripts.note_waiting(job_id, self.keys.nodes(), self._stages(needs), self.clock(),
                                          self.settings.exclusion_examples, _EXAMPLES_BUDGET)
        if isinstance(noted, NotWaiting):
            return None
        meta = noted.meta
        return Decision(job_id, DecisionOutcome.WAITING,
                        exclusions=explanation(meta["exclusions"], meta.get("examples", {})),
                        eligible=meta["eligible"], total=meta["total"], meta=meta, worker=noted.worker)

    def search(self, needs: JobNeeds) -> Search:
        """How the dispatch scripts look for a node for these needs."""
        s = self.settings
        # The capacity index holds ready, uncordoned nodes only; the job's own needs go before
        # the resources index: the likelier to rule a node out, the sooner it is checked.
        sets = [key for reason, keys, _ in self._stages(needs) if reason not in (
            Exclusion.STATUS_NOT_READY, Exclusion.NODE_CORDONED, Exclusion.CAPACITY_EXCEEDED,
            Exclusion.RESOURCE_THRESHOLD_EXCEEDED) for key in keys]
        sets.append(self.keys.resources_index())
        return Search(sets, s.dispatch_candidates, _CANDIDATE_BUDGET, int(s.heartbeat_timeout_seconds * 1000),
                      s.resource_threshold_percent, s.exclusion_examples)

    def dispatch(self, job_id: str, needs: JobNeeds) -> Decision:
        """Try to place one waiting job now."""
        reply = self.scripts.dispatch_job(job_id, needs.kind, self.clock(), self.search(needs))
        if isinstance(reply, Assigned):
            return Decision(job_id, DecisionOutcome.ASSIGNED, reply.node_id, reply.attempt, reply.exclusions,
                            waited_ms=reply.waited_ms)
        if isinstance(reply, NotWaiting):
            return Decision(job_id, DecisionOutcome.NOT_WAITING)
        return Decision(job_id, DecisionOutcome.WAITING, exclusions=reply.exclusions)

    def explain(self, needs: JobNeeds) -> tuple[int, int, dict[str, Any]]:
        """Walk every node: (eligible, total, exclusions by reason with examples).

        Only for a job that found no node (and for the eligibility endpoint):
        the one place where the dispatcher reads the whole fleet.
        """
        s = self.settings
        node_ids = texts(self.client.zrange(self.keys.nodes(), 0, -1))
        now = self.clock()
        counts: Counter[str] = Counter()
        examples: dict[str, list[str]] = {}
        eligible = 0
        for start in range(0, len(node_ids), _WALK_CHUNK):
            chunk = node_ids[start:start + _WALK_CHUNK]
            pipe = self.client.pipeline(transaction=False)
            for node_id in chunk:
                pipe.hmget(self.keys.node(node_id), NODE_FIELDS)
                pipe.hlen(self.keys.assigned(node_id))
            replies = pipe.execute()
            for i, node_id in enumerate(chunk):
                node = dict(zip(NODE_FIELDS, replies[2 * i], strict=True))
                failed = first_failure(evaluate(node, replies[2 * i + 1], needs, now,
                                                int(s.heartbeat_timeout_seconds * 1000), s.resource_threshold_percent))
                if failed is None:
                    eligible += 1
                    continue
                counts[failed.reason] += 1
                if len(examples.setdefault(failed.reason, [])) < s.exclusion_examples:
                    examples[failed.reason].append(node_id)
        return eligible, len(node_ids), explanation(counts, examples)

    def could_ever_take(self, needs: JobNeeds) -> bool:
        """Whether any registered node, whatever its status and load now, has what the job
        needs and cannot gain by waiting: the public pool, the selector's labels, a GPU and
        each model installed (in any state). Read a chunk of nodes at a time until one has;
        a yes is kept a second for its kind (a burst of fail_fast jobs walks once); a no is
        never kept: a node that registers the next moment must count."""
        now_s = time.monotonic()
        if now_s - self._ever.get(needs.kind, -_EVER_KEEP_S) < _EVER_KEEP_S:
            return True
        answer = False
        node_ids = texts(self.client.zrange(self.keys.nodes(), 0, -1))
        for start in range(0, len(node_ids), _WALK_CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for node_id in node_ids[start:start + _WALK_CHUNK]:
                pipe.hmget(self.keys.node(node_id), "accept_public", "labels", "gpu_count", "models")
            if any(_could_take(needs, *fields) for fields in pipe.execute()):
                answer = True
                break
        if answer:
            if len(self._ever) > 1000:
                self._ever.clear()
            self._ever[needs.kind] = now_s
        return answer

    def free_slots_anywhere(self) -> bool:
        """Whether any ready node has a free slot (else no waiting job can be placed)."""
        return bool(self.client.zcard(self.keys.capacity_index()))

    def record(self, decision: Decision) -> None:
        """Add one decision to the statistics and log it. The counts go to Redis in sums,
        at most once a second (dispatcher/tally.py): a decision adds no Redis call of its own."""
        counts = decision.exclusions.get("counts", {})
        DECISIONS.labels(decision.outcome).inc()
        for reason, n in counts.items():
            EXCLUSIONS.labels(reason).inc(n)
        for reason, ids in decision.exclusions.get("examples", {}).items():
            if ids:
                TALLY.examples(reason, ids)
        if decision.outcome is DecisionOutcome.ASSIGNED and decision.attempt == 1 and decision.waited_ms is not None:
            SUBMIT_TO_ASSIGN.observe(decision.waited_ms / 1000)
        log_event(log, "dispatch_decision", job_id=decision.job_id, outcome=decision.outcome,
                  node_id=decision.node_id, attempt=decision.attempt, exclusions=counts,
                  examples=decision.exclusions.get("examples", {}), eligible=decision.eligible,
                  total=decision.total)

    def flush(self) -> None:
        """Write this process's counts now (they go once a second by themselves)."""
        TALLY.flush()

    def stats(self) -> dict[str, Any]:
        self.flush()  # this process's latest decisions too
        raw = text_hash(self.client.hgetall(self.keys.stats()))
        examples = text_hash(self.client.hgetall(self.keys.stats_examples()))
        return {
            "decisions": {k.split(":", 1)[1]: int(v) for k, v in raw.items() if k.startswith("decisions:")},
            "excluded": {r: int(raw.get(f"excluded:{r}", 0)) for r in Exclusion},
            "examples": {r: json.loads(examples[r]) for r in Exclusion if r in examples},
            "waiting_jobs": self.client.zcard(self.keys.waiting()),
        }


def _could_take(needs: JobNeeds, accept_public: str | None, labels: str | None, gpu_count: str | None,
                models: str | None) -> bool:
    """Whether a node with these stored fields could take the job once ready and free."""
    node = NodeRecord.from_hash({"accept_public": accept_public, "labels": labels, "gpu_count": gpu_count,
                                 "models": models})
    if needs.public and not node.accept_public:
        return False
    if any(node.labels.get(key) != value for key, value in needs.node_selector):
        return False
    if needs.require_gpu and not node.gpu_count > 0:
        return False
    installed = {m.get("model_id") for m in node.models if isinstance(m.get("model_id"), str)}
    return all(model in installed for model in needs.required_models)
