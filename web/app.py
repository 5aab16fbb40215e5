"""The web process: node sessions at /ws/node, the HTTP API and the page."""

from __future__ import annotations

import logging

from flask import Flask
from flask_sock import Sock

from dispatcher.celery_app import app as celery_app
from dispatcher.connection import redis_client
from dispatcher.jobs import Jobs
from dispatcher.logs import configure_logging, log_event
from dispatcher.registry import Registry
from dispatcher.settings import Settings, get_settings
from web.api import api_blueprint
from web.hub import Hub
from web.page import page_blueprint
from web.session import NodeSession
from web.wsserver import server_options

log = logging.getLogger("web.app")


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    client = redis_client(settings)
    registry = Registry(client, settings)
    hub = Hub(registry, Jobs(client, settings, celery_app), settings)

    app = Flask(__name__)
    app.config["SOCK_SERVER_OPTIONS"] = server_options(settings.max_message_bytes, settings.ws_ping_interval_seconds)
    app.extensions["dispatcher.hub"] = hub
    sock = Sock(app)

    @sock.route("/ws/node")
    def node_socket(ws: object) -> None:
        hub.start()
        NodeSession(ws, hub).run()

    app.register_blueprint(api_blueprint(hub))
    app.register_blueprint(page_blueprint(hub))
    if not settings.registration_tokens:
        log_event(log, "open_registration", logging.WARNING,
                  why="no registration_tokens configured: any client may register as a node")
    if settings.admin_token is None:
        log_event(log, "open_admin", logging.WARNING,
                  why="no admin_token configured: anyone reaching the HTTP API may drain nodes")
    return app
