"""The fleet page at ``/``: one self-contained HTML file that polls the API."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from typing import Any

from flask import Blueprint, Response, jsonify

from dispatcher.filter import REASONS
from web.hub import Hub


def content_security_policy(html: str) -> str:
    """The page may run its own inline script (named by hash) and talk to this origin only:
    node-supplied text that slipped into the page could not run, load or send anything."""
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    return (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def page_blueprint(hub: Hub) -> Blueprint:
    page = Blueprint("page", __name__)
    html = (resources.files("web") / "templates" / "index.html").read_text()
    policy = content_security_policy(html)

    @page.get("/")
    def index() -> Any:
        return Response(html, mimetype="text/html",
                        headers={"Cache-Control": "no-store", "Content-Security-Policy": policy})

    @page.get("/api/info")
    def info() -> Any:
        """What the page needs to know about this deployment."""
        return jsonify(admin_token_required=hub.settings.admin_token is not None, web_id=hub.web_id,
                       resource_threshold_percent=hub.settings.resource_threshold_percent,
                       reasons=list(REASONS),
                       # Which Redis this is (not where, nor how to get in): a client can check it uses the same.
                       redis_run_id=hub.registry.client.info("server").get("run_id"),
                       redis_db=hub.registry.client.connection_pool.connection_kwargs.get("db", 0))

    return page
