"""The HTTP API of the web process (contract section 5)."""

from __future__ import annotations

import functools
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.core import Core
from dispatcher.errors import InvalidTransition, StoreError, StoreUnavailable, UnknownJob, UnknownNode
from dispatcher.filter import JobNeeds
from dispatcher.fleet import Fleet
from dispatcher.joblist import LIST_STATES, JobList
from dispatcher.messages import describe_validation_error, valid_job_id, valid_node_id
from dispatcher.registry import undrained_message
from dispatcher.vocabulary import NodeStatus
from web.hub import Hub

log = logging.getLogger("web.api")

#: The most one page of /api/nodes holds (a node record is at most about 70 KB).
MAX_PAGE_BYTES = 2 * 1024 * 1024


class BadQuery(ValueError):
    """Raised when a query, path or body value is malformed; answered with a JSON 400."""


def query_int(name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within [low, high]."""
    text = request.args.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadQuery(f"{name}: an integer, not {text[:40]!r}") from None
    if not low <= value <= high:
        raise BadQuery(f"{name}: between {low} and {high}, not {value}")
    return value


def encoded_views(fleet: Fleet, ids: list[str], next_cursor: str | None) -> tuple[list[str], str | None]:
    """The nodes' views as JSON texts, at most MAX_PAGE_BYTES of them (the next page then
    starts after the last one given), yielding the loop between chunks: a long answer
    never holds up the sessions this process serves."""
    parts: list[str] = []
    size, last = 0, None
    for views in fleet.views_in_chunks(ids):
        for view in views:
            text = json.dumps(view, separators=(",", ":"))
            if parts and size + len(text) > MAX_PAGE_BYTES:
                return parts, last
            parts.append(text)
            size, last = size + len(text), view["node_id"]
        time.sleep(0)
    return parts, next_cursor


def node_id_in_path(node_id: str) -> str:
    if not valid_node_id(node_id):
        raise UnknownNode(f"no node {node_id[:80]!r}: not a valid node id")
    return node_id


def job_id_in_path(job_id: str) -> str:
    if not valid_job_id(job_id):
        raise UnknownJob(f"no job {job_id[:80]!r}: not a valid job id")
    return job_id


class CordonRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field("no reason given", max_length=500)
    #: Who asks (a person's name, a ticket): recorded and shown.
    requested_by: str | None = Field(None, max_length=100)


class DrainRequest(CordonRequest):
    deadline_seconds: float | None = Field(None, gt=0)


Body = TypeVar("Body", bound=BaseModel)


def body_of(model: type[Body]) -> Body:
    """The request's JSON body (optional: absent, every field's default) as ``model``."""
    try:
        return model.model_validate(request.get_json(silent=True) or {})
    except ValidationError as exc:
        raise BadQuery(describe_validation_error(exc)) from exc


def listed_jobs(job_list: JobList, default_limit: int) -> dict[str, Any]:
    """The page of jobs the query asks for (``state``, ``node``, ``limit``, ``cursor``): ``jobs``
    and ``next_cursor``, with the query's ``state``, ``node_id`` and ``limit``."""
    state = query_choice("state", LIST_STATES)
    node_id = query_node_id("node")
    limit = query_int("limit", default_limit, 1, 500)
    try:
        listed, next_cursor = job_list.page(state, node_id, limit, request.args.get("cursor") or None)
    except ValueError:
        raise BadQuery("cursor: the next_cursor of an earlier page") from None
    return {"jobs": listed, "next_cursor": next_cursor, "state": state, "node_id": node_id, "limit": limit}


def requester(named: str | None = None) -> str:
    """Who asks: as the request names itself (body or ``?requested_by=``), else its address."""
    return (named or request.args.get("requested_by") or f"HTTP client {request.remote_addr}")[:100]


def query_choice(name: str, choices: tuple[str, ...]) -> str | None:
    """A query parameter that is one of ``choices``, or absent."""
    value = request.args.get(name)
    if value is not None and value not in choices:
        raise BadQuery(f"{name}: one of {', '.join(choices)}, not {value[:40]!r}")
    return value


def query_node_id(name: str) -> str | None:
    value = request.args.get(name) or None
    if value is not None and not valid_node_id(value):
        raise BadQuery(f"{name}: a node id ([A-Za-z0-9_.-]{{1,64}}), not {value[:80]!r}")
    return value


#: Where ``create_app`` keeps the process's core and hub: ``app.extensions``, Flask's place for
#: what an app holds for its whole life (``flask.g`` lasts one request).
CORE = "dispatcher.core"
HUB = "dispatcher.hub"


def current_core() -> Core:
    """The core of the app handling this request (dispatcher/core.py)."""
    core: Core = current_app.extensions[CORE]
    return core


def current_hub() -> Hub:
    """The hub of the app handling this request: its sessions and web id."""
    hub: Hub = current_app.extensions[HUB]
    return hub


api = Blueprint("api", __name__)


def admin(view: Callable[..., Any]) -> Callable[..., Any]:
    """Mutating endpoints need ``Authorization: Bearer <admin_token>`` when one is set."""
    @functools.wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        admin_token = current_core().settings.admin_token
        if admin_token is not None:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), admin_token.get_secret_value().encode()):
                response = jsonify(error="this endpoint needs Authorization: Bearer <admin_token>")
                response.status_code = 401
                response.headers["WWW-Authenticate"] = 'Bearer realm="dispatcher"'
                return response
        return view(*args, **kwargs)
    return guarded


@api.get("/healthz")
def healthz() -> Any:
    hub = current_hub()
    return jsonify(status="ok", web_id=hub.web_id, sessions=hub.session_count())


@api.get("/readyz")
def readyz() -> Any:
    try:
        current_core().ping()
    except StoreError as exc:
        return jsonify(status="unavailable", error=f"redis: {exc}"), 503
    return jsonify(status="ok")


@api.get("/api/nodes")
def nodes() -> Any:
    """One page of nodes in id order: ``?status=&limit=&cursor=``; ``next_cursor`` is
    the ``cursor`` of the next page (null on the last)."""
    fleet = current_core().fleet
    status = query_choice("status", tuple(NodeStatus))
    limit = query_int("limit", 100, 1, 1000)
    try:
        cursor = query_node_id("cursor")
    except BadQuery:
        raise BadQuery("cursor: the next_cursor of an earlier page") from None
    ids, next_cursor = fleet.page(status, limit, cursor)
    parts, next_cursor = encoded_views(fleet, ids, next_cursor)
    body = (f'{{"nodes":[{",".join(parts)}],"next_cursor":{json.dumps(next_cursor)},'
            f'"counts":{json.dumps(fleet.counts_by_status())}}}')
    return Response(body, mimetype="application/json")


def found(view: dict[str, Any] | None, missing: Exception) -> Any:
    """The view as JSON, or the 404 the error handlers give an unknown node or job."""
    if view is None:
        raise missing
    return jsonify(view)


@api.get("/api/nodes/<node_id>")
def node(node_id: str) -> Any:
    return found(current_core().fleet.node(node_id_in_path(node_id)), UnknownNode(f"no node {node_id}"))


@api.post("/api/nodes/<node_id>/drain")
@admin
def drain(node_id: str) -> Any:
    core = current_core()
    node_id_in_path(node_id)
    body = body_of(DrainRequest)
    outcome = core.registry.drain(node_id, requester(body.requested_by), body.reason, body.deadline_seconds)
    return jsonify(node_id=node_id, status=outcome.status, jobs_left=outcome.jobs_left,
                   drain=(core.fleet.node(node_id) or {}).get("drain"))


def reopened(node_id: str, status: str, **fields: Any) -> Any:
    """After an undrain or an uncordon: the node may take waiting jobs."""
    current_core().jobs.request_kick()
    return jsonify(node_id=node_id, status=status, **fields)


@api.delete("/api/nodes/<node_id>/drain")
@admin
def undrain(node_id: str) -> Any:
    status = current_core().registry.undrain(node_id_in_path(node_id), requester())
    return reopened(node_id, status, message=undrained_message(node_id, status))


@api.post("/api/nodes/<node_id>/cordon")
@admin
def cordon(node_id: str) -> Any:
    """No new jobs for the node; it keeps its status, session and jobs (JSON body optional:
    ``reason``, ``requested_by``)."""
    core = current_core()
    node_id_in_path(node_id)
    body = body_of(CordonRequest)
    status = core.registry.cordon(node_id, requester(body.requested_by), body.reason)
    return jsonify(node_id=node_id, status=status, cordon=(core.fleet.node(node_id) or {}).get("cordon"))


@api.delete("/api/nodes/<node_id>/cordon")
@admin
def uncordon(node_id: str) -> Any:
    return reopened(node_id, current_core().registry.uncordon(node_id_in_path(node_id), requester()), cordon=None)


@api.delete("/api/nodes/<node_id>")
@admin
def forget(node_id: str) -> Any:
    """Delete an offline node, its secret and its history (409 for any other node)."""
    current_core().registry.forget(node_id_in_path(node_id), requester())
    return jsonify(node_id=node_id, forgotten=True)


def flag(name: str) -> bool:
    """A true-or-false query parameter (false when absent)."""
    value = request.args.get(name, "false").lower()
    if value not in ("1", "true", "yes", "0", "false", "no"):
        raise BadQuery(f"{name}: true or false, not {value[:40]!r}")
    return value in ("1", "true", "yes")


@api.get("/api/nodes/<node_id>/eligibility")
def eligibility(node_id: str) -> Any:
    """Why not this node: each filter step for one job (``?job=<id>``, or its needs
    as ``required_models=a,b&require_gpu=true&public=true&node_selector=k=v,k2=v2``)."""
    core = current_core()
    node_id_in_path(node_id)
    args = request.args
    if "job" in args:
        needs = core.jobs.needs_of(job_id_in_path(args["job"]))
    else:
        models = tuple(m for m in args.get("required_models", "").split(",") if m)
        pairs = [p.split("=", 1) for p in args.get("node_selector", "").split(",") if p]
        if any(len(p) != 2 for p in pairs):
            raise BadQuery("node_selector: write key=value pairs separated by commas")
        needs = JobNeeds(models, flag("require_gpu"), flag("public"), tuple(sorted((k, v) for k, v in pairs)))
    return found(core.job_views.eligibility(node_id, needs), UnknownNode(f"no node {node_id}"))


@api.get("/api/jobs")
def job_list() -> Any:
    """One page of jobs, newest submitted first: ``?state=&node=&limit=&cursor=``;
    ``next_cursor`` is the ``cursor`` of the next page (null on the last)."""
    listed = listed_jobs(current_core().job_list, 50)
    return jsonify(jobs=listed["jobs"], next_cursor=listed["next_cursor"])


@api.get("/api/jobs/<job_id>")
def job(job_id: str) -> Any:
    return found(current_core().job_views.view(job_id_in_path(job_id)),
                 UnknownJob(f"no job {job_id} (unknown, or finished longer ago than the retention)"))


@api.get("/api/stats")
def stats() -> Any:
    """Dispatch statistics (decisions, exclusions by reason, examples) and the last scan."""
    core = current_core()
    return jsonify({**core.stats(), "scan": core.fleet.last_scan()})


@api.get("/metrics")
def metrics() -> Any:
    return Response(current_core().metrics(), mimetype="text/plain; version=0.0.4")


@api.get("/api/transitions")
def transitions() -> Any:
    return jsonify(transitions=current_core().fleet.recent_transitions(query_int("limit", 50, 1, 500)))


@api.errorhandler(UnknownNode)
@api.errorhandler(UnknownJob)
def unknown(exc: Exception) -> Any:
    return jsonify(error=str(exc)), 404


@api.errorhandler(BadQuery)
def bad_query(exc: BadQuery) -> Any:
    return jsonify(error=str(exc)), 400


@api.errorhandler(InvalidTransition)
def conflict(exc: InvalidTransition) -> Any:
    return jsonify(error=str(exc)), 409


def store_failure(exc: StoreError) -> tuple[int, str]:
    """The HTTP status and the words for a store failure. A 503, which clients and routers
    retry, only when trying again can help (``StoreUnavailable``: Redis out of reach, or
    refusing for the moment); what Redis refuses for good, or a script answering what it
    never does, fails the same way every time: a 500, logged with its traceback."""
    if isinstance(exc, StoreUnavailable):
        return 503, f"the dispatcher's store is unavailable: {exc}"
    log.error("store_failed", exc_info=exc, extra={"event": "store_failed", "path": request.path})
    return 500, f"the dispatcher's store refused the request: {exc}"


@api.errorhandler(StoreError)
def store_down(exc: StoreError) -> Any:
    status, text = store_failure(exc)
    return jsonify(error=text), status


@api.after_request
def no_store(response: Response) -> Response:
    response.headers.setdefault("Cache-Control", "no-store")
    return response
