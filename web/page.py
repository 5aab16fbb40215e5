"""The fleet page at ``/`` and the job list at ``/jobs``, rendered on the server.

The first paint is complete HTML (no wait for a poll). The page's one script
then fetches ``/live`` (the same fragment, rendered again) every two seconds
and sends the admin buttons' requests to the API. Everything nodes and
clients wrote goes through Jinja's autoescaping.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, jsonify, render_template, request

from dispatcher.errors import StoreError
from dispatcher.joblist import LIST_STATES
from dispatcher.vocabulary import Exclusion, NodeStatus
from dispatcher.wording import ago, duration, plural, seconds_since
from web.api import BadQuery, current_core, current_hub, listed_jobs, store_failure

#: Nodes the page shows (the API pages through the rest).
PAGE_NODES = 500


def content_security_policy(html: str) -> str:
    """The page may run its own inline script (named by hash) and talk to this origin only:
    node-supplied text that slipped into the page could not run, load or send anything."""
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    allowed = hashes or "'none'"
    return (f"default-src 'none'; script-src {allowed}; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def jobs_url(**query: Any) -> str:
    """The job list's address with these filters (those given)."""
    given = {k: v for k, v in query.items() if v}
    return "/jobs" + ("?" + urlencode(given) if given else "")


def html_response(html: str, status: int = 200) -> Response:
    return Response(html, status=status, mimetype="text/html",
                    headers={"Cache-Control": "no-store", "Content-Security-Policy": content_security_policy(html)})


page = Blueprint("page", __name__)

for _name, _helper in (("ago", ago), ("duration", duration), ("plural", plural), ("since", seconds_since)):
    page.add_app_template_filter(_helper, _name)
page.add_app_template_global(jobs_url)


def admin_required() -> bool:
    return current_core().settings.admin_token is not None


def live(admin: bool) -> dict[str, Any]:
    """What the fleet page shows, as the templates read it."""
    core = current_core()
    fleet = core.fleet
    ids, more = fleet.page(None, PAGE_NODES, None)
    views = []
    for chunk in fleet.views_in_chunks(ids):
        views += chunk
        time.sleep(0)  # a large fleet never holds up the sessions this process serves
    counts = fleet.counts_by_status()
    return {"nodes": views, "more_nodes": more is not None, "counts": [(s, counts.get(s, 0)) for s in NodeStatus],
            "stats": core.stats(), "scan": fleet.last_scan(), "reasons": Exclusion,
            "transitions": fleet.recent_transitions(25), "admin": admin, "now_ms": time.time() * 1000,
            "threshold": core.settings.resource_threshold_percent}


@page.get("/")
def index() -> Any:
    # The first paint shows the admin buttons only when no token is asked for.
    required = admin_required()
    return html_response(render_template("index.html", admin_required=required, **live(not required)))


@page.get("/live")
def live_fragment() -> Any:
    """The fleet page's changing part, for its script (``?admin=1``: with the buttons)."""
    return html_response(render_template("live.html", **live(request.args.get("admin") == "1")))


@page.get("/jobs")
def job_page() -> Any:
    """The jobs, newest first: ``?state=&node=&cursor=`` as ``/api/jobs`` takes them."""
    return html_response(render_template("jobs.html", **listed_jobs(current_core().job_list, 100),
                                          states=LIST_STATES, now_ms=time.time() * 1000))


@page.errorhandler(BadQuery)
def bad_query(exc: BadQuery) -> Any:
    return Response(f"Bad request: {exc}\n", status=400, mimetype="text/plain")


@page.errorhandler(StoreError)
def store_down(exc: StoreError) -> Any:
    # (the page's script shows it, and keeps trying)
    status, text = store_failure(exc)
    return Response(f"{text[:1].upper()}{text[1:]}\n", status=status, mimetype="text/plain")


@page.get("/api/info")
def info() -> Any:
    """What a client needs to know about this deployment."""
    core = current_core()
    return jsonify(admin_token_required=admin_required(), web_id=current_hub().web_id,
                   resource_threshold_percent=core.settings.resource_threshold_percent,
                   reasons=list(Exclusion),
                   # Which Redis this is (not where, nor how to get in): a client can check it uses the same.
                   **core.store_identity())
