"""The GPU dispatcher: the server's core, the wire messages and the reference node agent.

This file imports nothing, and must not: ``dispatcher.messages`` and ``dispatcher.agent``
run on nodes installed with the agent's extra only, without Celery, Flask, gevent or a
Redis client (tests/test_packaging.py holds them to it).
"""
