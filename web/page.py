"""The fleet page at ``/``: one self-contained HTML file that polls the API."""

from __future__ import annotations

from importlib import resources
from typing import Any

from flask import Blueprint, Response, jsonify

from dispatcher.filter import REASONS
from web.hub import Hub


def page_blueprint(hub: Hub) -> Blueprint:
    page = Blueprint("page", __name__)
    html = (resources.files("web") / "templates" / "index.html").read_text()

    @page.get("/")
    def index() -> Any:
        return Response(html, mimetype="text/html", headers={"Cache-Control": "no-store"})

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
