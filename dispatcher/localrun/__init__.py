"""The local run and the tests' own Redis: tools for one machine, kept apart from the core.

``run`` is ``dispatcher up`` (a private redis-server, the Procfile's processes through
honcho, demo node agents, a demo job); ``redis_server`` starts and stops a private
redis-server, for the local run, the tests and the benchmarks. No process of a deployed
system imports this package.
"""
