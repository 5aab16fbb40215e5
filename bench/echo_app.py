"""Baseline for bench/sessions.py: flask-sock echo under the same gunicorn settings."""

from flask import Flask
from flask_sock import Sock

app = Flask(__name__)
sock = Sock(app)


@sock.route("/ws/node")
def echo(ws):  # type: ignore[no-untyped-def]
    while True:
        ws.send(ws.receive())


@app.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    return "ok"
