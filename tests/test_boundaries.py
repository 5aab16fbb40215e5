"""The boundaries docs/architecture.md draws, read off the source: who may import what, and
who may run Lua. Fast: the source is parsed, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules(package: str) -> dict[str, ast.Module]:
    """Dotted module name -> its parsed source, for every module under ``package``."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def imported(tree: ast.Module) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names (absolute imports only)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def top(name: str) -> str:
    return name.split(".")[0]


CORE = modules("dispatcher")
WEB = modules("web")


def test_the_core_never_imports_the_web_layer() -> None:
    offenders = {name: sorted(n for n in imported(tree) if top(n) == "web") for name, tree in CORE.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_node_agent_needs_only_the_wire_models_and_the_vocabulary() -> None:
    allowed_own = {"dispatcher.messages", "dispatcher.vocabulary"}
    server_only = {"celery", "kombu", "redis", "flask", "flask_sock", "gevent", "gunicorn", "web"}
    agent = {name: tree for name, tree in CORE.items() if name.startswith("dispatcher.agent")}
    assert agent, "the agent's modules were found"
    wrong = {}
    for name, tree in agent.items():
        names = imported(tree)
        own = {n for n in names if top(n) == "dispatcher" and not n.startswith("dispatcher.agent")}
        bad = (own - allowed_own) | {n for n in names if top(n) in server_only}
        if bad:
            wrong[name] = sorted(bad)
    assert wrong == {}


def test_the_wire_models_and_the_vocabulary_stand_alone() -> None:
    for name, allowed in (("dispatcher.vocabulary", set()), ("dispatcher.messages", {"dispatcher.vocabulary"})):
        own = {n for n in imported(CORE[name]) if top(n) in ("dispatcher", "web")}
        assert own <= allowed, f"{name} imports {sorted(own - allowed)}"


def calls_named(tree: ast.Module, attributes: set[str]) -> list[int]:
    """Lines calling a method whose name is in ``attributes`` (``x.evalsha(...)``)."""
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in attributes]


def test_only_the_script_loader_runs_lua() -> None:
    lua_calls = {"register_script", "eval", "evalsha", "eval_ro", "evalsha_ro", "script_load", "fcall"}
    runners = {name: lines for name, tree in {**CORE, **WEB}.items() if (lines := calls_named(tree, lua_calls))}
    # batching.py sends what scripts.py registered, grouped into pipelines for the web process.
    assert set(runners) <= {"dispatcher.scripts", "dispatcher.batching"}, runners


def test_only_keys_names_redis_keys() -> None:
    """No f-string outside keys.py starts with a key prefix (``f"{keys.prefix}:node:{id}"``):
    a key built by hand would drift from the one the scripts get."""
    def builds_a_key(node: ast.AST) -> bool:
        if not isinstance(node, ast.JoinedStr) or not node.values:
            return False
        first = node.values[0]
        return isinstance(first, ast.FormattedValue) and "prefix" in ast.unparse(first.value)
    offenders = {name: [getattr(n, "lineno", 0) for n in ast.walk(tree) if builds_a_key(n)]
                 for name, tree in {**CORE, **WEB}.items() if name != "dispatcher.keys"}
    assert {name: lines for name, lines in offenders.items() if lines} == {}
    assert any(builds_a_key(n) for n in ast.walk(CORE["dispatcher.keys"])), "the check sees keys.py's own"


def test_the_web_layer_never_handles_redis_py_errors_itself() -> None:
    """The core turns redis-py's errors into StoreError: web/ catches the project's errors only."""
    importers = sorted(name for name, tree in WEB.items() if "redis" in {top(n) for n in imported(tree)})
    assert importers == []
