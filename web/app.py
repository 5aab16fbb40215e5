"""The web process: node sessions at /ws/node, the HTTP API and the page."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, request
from flask_sock import Sock
from werkzeug.exceptions import HTTPException

from dispatcher.celery_app import app as celery_app
from dispatcher.core import build_core
from dispatcher.logs import configure_logging, log_event
from dispatcher.settings import Settings, get_settings
from web.admission import Admission
from web.api import CORE, HUB, api
from web.hub import Hub
from web.page import page
from web.session import NodeSession
from web.transport import server_options

log = logging.getLogger("web.app")

#: Where nodes open their sessions.
NODE_PATH = "/ws/node"


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    # Thousands of sessions' script calls (heartbeats, pops, acks) go to Redis grouped in pipelines.
    core = build_core(settings, celery_app, batch_scripts=True)
    hub = Hub(core.registry, core.jobs, settings, fleet=core.fleet, outbox=core.outbox)

    app = Flask(__name__)
    app.config["SOCK_SERVER_OPTIONS"] = server_options()
    # The views find both here (web/api.py, current_core and current_hub); gunicorn_conf the hub.
    app.extensions[CORE] = core
    app.extensions[HUB] = hub
    sock = Sock(app)

    # Before Flask and before the handshake: a refused client costs one short HTTP answer.
    app.wsgi_app = Admission(app.wsgi_app, NODE_PATH, settings, hub.admit, hub.count_refusal)  # type: ignore[method-assign]

    @sock.route(NODE_PATH)
    def node_socket(ws: object) -> None:
        hub.start()
        NodeSession(ws, hub, request.environ["dispatcher.client_address"]).run()

    app.register_blueprint(api)
    app.register_blueprint(page)

    @app.errorhandler(404)
    @app.errorhandler(405)
    def api_paths_answer_json(exc: HTTPException) -> Any:
        if request.path.startswith("/api/"):
            return jsonify(error=f"{exc.name}: {request.method} {request.path[:200]}"), exc.code
        return exc

    @app.after_request
    def security_headers(response: Response) -> Response:
        # The page sets its own policy (its one inline script, by hash); everything else is data.
        response.headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response
    if not settings.registration_tokens:
        log_event(log, "open_registration", logging.WARNING,
                  why="no registration_tokens configured: any client may register as a node")
    if settings.admin_token is None:
        log_event(log, "open_admin", logging.WARNING,
                  why="no admin_token configured: anyone reaching the HTTP API may drain, cordon and forget nodes")
    return app
