"""The Lua loader and what it asks of the scripts: every expanded script compiles, a Redis
error names the source file and line, no script writes a domain word as a literal, and each
script's header says which bundle keys it writes."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from dispatcher.errors import StoreError
from dispatcher.jobs import Jobs
from dispatcher.keys import Keys
from dispatcher.messages import NodeRegister
from dispatcher.recovery import Recovery
from dispatcher.registry import Registry, hash_secret
from dispatcher.scripts import (
    DrainExpired,
    DrainStarted,
    ScriptError,
    Scripts,
    Source,
    WentOffline,
    _expanded,
    _lua_folder,
    script_sources,
    script_table,
)
from dispatcher.vocabulary import LUA_ENUMS, CloseCode, FailureCode, inline_lua_constants
from tests.conftest import client_app
from tests.test_dispatch import T0 as FLEET_T0
from tests.test_dispatch import add_node

LUA = Path(__file__).resolve().parent.parent / "lua"
T0 = 1_700_000_000_000

#: A Lua token the checks below care about; everything between them is skipped. Comments and
#: strings are whole tokens, so a quote in a comment or "--" in a string misleads nothing.
_TOKEN = re.compile(r"""
    (?P<comment>--(?:\[(?P<ceq>=*)\[.*?\](?P=ceq)\]|[^\n]*))
  | (?P<long>\[(?P<leq>=*)\[.*?\](?P=leq)\])
  | (?P<string>'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*")
  | (?P<number>\b\d+(?:\.\d+)?\b)
  | (?P<name>[A-Za-z_]\w*)
""", re.VERBOSE | re.DOTALL)


def lua_files() -> list[Path]:
    return sorted(LUA.glob("*.lua"))


def read(name: str) -> str:
    return (_lua_folder() / name).read_text()


def line_of(path: Path, fragment: str) -> int:
    """The line of ``path`` holding ``fragment`` (exactly one)."""
    lines = [i for i, line in enumerate(path.read_text().split("\n"), 1) if fragment in line]
    assert len(lines) == 1, (path.name, fragment, lines)
    return lines[0]


# --- every script compiles ---------------------------------------------------


def test_every_expanded_script_compiles(r: redis.Redis) -> None:
    sources = script_sources()
    assert {p.stem for p in lua_files() if not p.name.startswith("_")} == set(sources)
    for name, text in sources.items():
        try:
            r.script_load(text)
        except redis.ResponseError as exc:
            pytest.fail(f"{name} does not compile: {script_table()[name].locate(str(exc))}")


def test_each_line_of_an_expanded_script_is_traced_to_its_file() -> None:
    for name, source in script_table().items():
        lines = source.text.split("\n")
        assert len(lines) == len(source.origins), name
        for line, origin in zip(lines, source.origins, strict=True):
            if origin is not None:
                source_line = (LUA / origin[0]).read_text().split("\n")[origin[1] - 1]
                assert inline_lua_constants(source_line) == line, (name, origin)  # its words written in


# --- errors name the source file and line --------------------------------------

#: A script that fails where it is told to (its body has an include, as the real ones do).
BROKEN = """--#include node
-- broken_test: fails on purpose, at the line P.fail names.
redis.call('SET', P.key, 'a string')
if P.fail == 'error' then
  error('boom')
end
if P.fail == 'wrongtype' then
  redis.call('HSET', P.key, 'field', 'value')
end
return 'ok'
"""


@pytest.fixture
def broken(r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Scripts, Source]]:
    """Scripts with BROKEN among them, loaded through the loader's own expansion."""
    source = _expanded("broken_test.lua", BROKEN, read)
    scripts = Scripts(r, Keys())
    monkeypatch.setitem(script_table(), "broken_test", source)
    monkeypatch.setitem(scripts._scripts, "broken_test", r.register_script(source.text))
    yield scripts, source


@pytest.mark.parametrize(("fail", "line", "text"), [("error", 5, "boom"), ("wrongtype", 8, "WRONGTYPE")])
def test_an_error_in_a_script_names_its_file_and_line(broken: tuple[Scripts, Source], fail: str, line: int,
                                                      text: str) -> None:
    scripts, source = broken
    with pytest.raises(StoreError) as caught:
        scripts._call("broken_test", scripts.keys.node_bundle("n1"), {"node_id": "n1", "key": "{test}:broken",
                                                                      "fail": fail})
    message = str(caught.value)
    assert message.startswith("broken_test: ")
    assert f"lua/broken_test.lua:{line}" in message and text in message
    assert "user_script" not in message
    assert isinstance(caught.value.__cause__, redis.ResponseError)
    assert isinstance(caught.value, redis.ResponseError)  # as callers that catch those expect
    assert str(pickle.loads(pickle.dumps(caught.value))) == message  # (a Celery task may raise it)
    # The line Redis named is the expanded text's, far below the source's.
    expanded_line = int(re.search(r"user_script:(\d+)", str(caught.value.__cause__)).group(1))
    assert source.origins[expanded_line - 1] == ("broken_test.lua", line) and expanded_line > line


def test_an_error_in_a_prelude_names_the_prelude(r: redis.Redis) -> None:
    scripts = Scripts(r, Keys())
    r.hset(scripts.keys.job("j1"), mapping={"state": "waiting", "needs_class": "kind-a"})
    with pytest.raises(ScriptError, match=r"lua/_job\.lua:(\d+): job j1 is of kind kind-a, not kind-b") as caught:
        scripts.expire_dispatch("j1", "kind-b", T0, "no node", {}, 1000)
    assert int(re.search(r"_job\.lua:(\d+)", str(caught.value)).group(1)) == line_of(LUA / "_job.lua",
                                                                                    "' is of kind '")


def test_a_script_that_does_not_compile_names_its_file_and_line(r: redis.Redis,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    source = _expanded("broken_test.lua", "--#include job\n-- line 2\nlocal x = = 1\n", read)
    scripts = Scripts(r, Keys())
    monkeypatch.setitem(script_table(), "broken_test", source)
    monkeypatch.setitem(scripts._scripts, "broken_test", r.register_script(source.text))
    with pytest.raises(ScriptError, match=r"^broken_test: Error compiling script .*lua/broken_test\.lua:3: "
                                          r"unexpected symbol near '='"):
        scripts._call("broken_test", scripts.keys.job_bundle("j1", "k"), {"job_id": "j1"})


def test_a_script_without_include_is_its_own_text() -> None:
    plain = _expanded("plain.lua", "local a = 1\nreturn a", read)
    assert plain.text == "local a = 1\nreturn a" and plain.where(2) == "lua/plain.lua:2"
    assert plain.locate("user_script:2: x script: abc, on @user_script:2.") == \
        "lua/plain.lua:2: x script: abc, on lua/plain.lua:2."


# --- every domain word comes from the constants -----------------------------------

#: Literals that equal a domain word but are not one, by file: how many, and what they are.
#: Anything else equal to a value of LUA_ENUMS is a literal that should be a constant.
NOT_DOMAIN_WORDS = {
    ("expire_warmup.lua", "waiting"): (1, "its reply: the warmup is not over"),
    ("undrain_node.lua", "cancelled"): (3, "drain_outcome's word, and the reply saying so"),
}


def literals(text: str) -> Iterator[tuple[int, str, str]]:
    """(line, kind, value) of each string and number literal of Lua ``text`` outside comments."""
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind in ("string", "long", "number"):
            value = match.group(kind)
            if kind == "string":
                value = value[1:-1]
            elif kind == "long":
                value = value[value.index("[", 1) + 1:value.rindex("]", 0, -1)]
            yield text.count("\n", 0, match.start()) + 1, kind, value


def test_no_script_writes_a_domain_word_as_a_literal() -> None:
    words = {str(m.value): f"{lua_name}.{m.name}" for lua_name, enum in LUA_ENUMS.items() for m in enum
             if isinstance(m.value, str)}
    # Close codes are numbers; 1000 (NORMAL) is left out, as it is also the milliseconds in a second.
    codes = {str(int(m)): f"CloseCode.{m.name}" for m in CloseCode if m != CloseCode.NORMAL}
    found: dict[tuple[str, str], list[int]] = {}
    wrong = []
    for path in lua_files():
        for line, kind, value in literals(path.read_text()):
            if kind == "number" and value in codes:
                wrong.append(f"lua/{path.name}:{line}: {value} should be {codes[value]}")
            elif kind != "number" and value in words:
                found.setdefault((path.name, value), []).append(line)
    for (name, value), lines in found.items():
        allowed, _ = NOT_DOMAIN_WORDS.get((name, value), (0, ""))
        if len(lines) != allowed:
            wrong.append(f"lua/{name}:{','.join(map(str, lines))}: {value!r} should be {words[value]}"
                         f" ({len(lines)} found, {allowed} known not to be one)")
    assert not wrong, "\n".join(wrong)
    assert set(NOT_DOMAIN_WORDS) <= set(found), "a known exception is gone: remove it from NOT_DOMAIN_WORDS"


def test_the_literal_check_sees_through_comments_and_finds_literals() -> None:
    text = "-- 'ready' in a comment\nlocal s = 'ready' -- and \"offline\"\nlocal t = [[draining]] .. \"x--y\"\nf(4002)"
    assert list(literals(text)) == [(2, "string", "ready"), (3, "long", "draining"), (3, "string", "x--y"),
                                    (4, "number", "4002")]


# --- code decides on codes, never on human text ------------------------------------


@pytest.fixture
def fleet(make_settings: Any, r: redis.Redis, db_url: str) -> tuple[Registry, Jobs]:
    settings = make_settings(key_prefix="{loadertest}")  # (a prefix of its own: its tally counts stay its own)
    clock = lambda: FLEET_T0 + 10_000  # noqa: E731
    return Registry(r, settings, clock=clock), Jobs(r, settings, client_app(db_url), clock=clock)


def test_a_node_offline_records_why_as_a_code_and_recovery_decides_on_it(fleet: tuple[Registry, Jobs],
                                                                          r: redis.Redis) -> None:
    registry, jobs = fleet
    scripts, keys, now = jobs.scripts, jobs.keys, FLEET_T0 + 10_000
    cause = lambda node_id: r.hget(keys.node(node_id), "offline_cause")  # noqa: E731
    drained = add_node(registry)
    assert jobs.submit("j-drained", {"job_type": "t"}).node_id == drained
    lost = add_node(registry)
    assert jobs.submit("j-lost", {"job_type": "t"}).node_id == lost
    assert isinstance(scripts.drain_node(drained, now, "op", "test", now + 500), DrainStarted)
    assert cause(drained) is None
    assert scripts.expire_drain(drained, now + 1000) == DrainExpired(1)
    assert isinstance(scripts.expire_node(lost, now + 1000, 1, 0), WentOffline)
    assert (cause(drained), cause(lost)) == (FailureCode.DRAIN_DEADLINE, FailureCode.NODE_LOST)
    # The reasons are for people: recovery reads the codes, whatever the reasons say.
    r.hset(keys.node(drained), "status_reason", "no heartbeat for 9 s")
    r.hset(keys.node(lost), "status_reason", "drain deadline passed with 1 job left")
    Recovery(jobs).scan(now=now + 1000)
    outcome = lambda job_id: json.loads(r.hget(keys.job(job_id), "attempts"))[0]["outcome"]  # noqa: E731
    assert (outcome("j-drained"), outcome("j-lost")) == (FailureCode.DRAIN_DEADLINE, FailureCode.NODE_LOST)
    # Back from offline, the node has no cause any more.
    r.hset(keys.node(lost), "secret_hash", hash_secret("its secret"))
    msg = NodeRegister.model_validate_json(json.dumps({"type": "node_register", "node_id": lost,
                                                       "node_secret": "its secret"}))
    assert registry.register(msg, "s2", "w", now=now + 2000).resumed
    assert r.hget(keys.node(lost), "status") == "registering" and cause(lost) is None


# --- each script's header lists the bundle keys it writes ---------------------------
#
# A static check, and a simple one: it reads the Lua text, not what runs. It follows every
# function a script calls, in its own text and in its preludes, and the keys a function is
# given as arguments (deliver_to(K.queue, ...) writes K.queue), so a key written anywhere on
# the way counts. What it cannot see: a key named by a variable that is neither a bundle key,
# a parameter nor a loop over a table of bundle keys (a candidate node's keys built from
# P.node_key, KEYS[NEXT + i]: not in a bundle, so not listed), and which branch runs (a key a
# script may write counts). A computed name counts as every key it may be: K[status] (the
# Writes line says `K[status]` for all the status sets), J['finished_' .. state] (the line
# names the J.finished_<state> keys of the states the script ends jobs in).

#: Redis commands that write their key (DEL: all its keys), and those that do not.
WRITE_COMMANDS = {"SET", "DEL", "EXPIRE", "PEXPIREAT", "HSET", "HDEL", "HINCRBY", "SADD", "SREM", "ZADD", "ZREM",
                  "ZREMRANGEBYSCORE", "RPUSH", "LPUSH", "LTRIM"}
READ_COMMANDS = {"EXISTS", "GET", "HGET", "HMGET", "HLEN", "HVALS", "LRANGE", "SCARD", "SMISMEMBER", "TYPE", "ZCARD",
                 "ZINTERCARD", "ZMSCORE", "ZRANGE", "ZSCORE", "PUBLISH"}  # (PUBLISH writes no key)
STATUS_SETS = "K[status]"
FINISHED = "J.finished_*"
_FUNCTION = re.compile(r"^( *)local function (\w+)\(([^)]*)\)", re.MULTILINE)
_CALL = re.compile(r"(?<![\w.:])(redis\.call|\w+)\s*\(")
_LOOP = re.compile(r"for\s+_\s*,\s*(\w+)\s+in\s+ipairs\(\s*\{([^}]*)\}\s*\)")


def without_comments(text: str) -> str:
    """``text`` with its comments blanked (lines kept where they were)."""
    return _TOKEN.sub(lambda m: re.sub(r"[^\n]", " ", m.group()) if m.lastgroup == "comment" else m.group(), text)


def call_arguments(code: str, open_at: int) -> list[str]:
    """The arguments of the call whose "(" is at ``open_at``, split at its top-level commas."""
    depth, start, args, i = 0, open_at + 1, [], open_at
    while i < len(code):
        char = code[i]
        if char in "'\"":
            i = _TOKEN.match(code, i).end()
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                args.append(code[start:i].strip())
                return [a for a in args if a]
        elif char == "," and depth == 1:
            args.append(code[start:i].strip())
            start = i + 1
        i += 1
    raise AssertionError(f"unbalanced call at {code[open_at:open_at + 60]!r}")


class Function:
    """A Lua function's text (or a script's top-level code): what it writes, and which of its
    parameters it writes to (by position)."""

    def __init__(self, name: str, params: list[str], code: str) -> None:
        self.name, self.params, self.code = name, params, code
        self.writes: set[str] = set()
        self.key_params: set[int] = set()
        #: A loop variable -> the keys of the tables it goes over (``for _, key in ipairs({K.a, K.b})``).
        self.loops: dict[str, list[str]] = {}
        for var, keys in _LOOP.findall(code):
            self.loops.setdefault(var, []).extend(k.strip() for k in keys.split(","))

    def keys_of(self, expression: str) -> tuple[set[str], set[int]]:
        """The bundle keys, and the positions of this function's parameters, ``expression`` names."""
        expression = expression.strip()
        if re.fullmatch(r"[KJ]\.\w+", expression):
            return {expression}, set()
        if expression.startswith(("K[", "status_key(")):
            return {STATUS_SETS}, set()
        if expression.startswith("J[") and "finished_" in expression:
            return {FINISHED}, set()
        if expression in self.params:
            return set(), {self.params.index(expression)}
        keys: set[str] = set()
        for key in self.loops.get(expression, []):
            keys |= self.keys_of(key)[0]
        return keys, set()

    def step(self, functions: dict[str, Function]) -> bool:
        """Add what this function's writes and calls name; whether anything was new."""
        before = (len(self.writes), len(self.key_params))
        for match in _CALL.finditer(self.code):
            name, open_at = match.group(1), match.end() - 1
            args = call_arguments(self.code, open_at)
            if name == "redis.call":
                command = args[0].strip("'\"") if args and args[0][:1] in "'\"" else None
                assert command is None or command in WRITE_COMMANDS | READ_COMMANDS, \
                    f"{self.name}: redis.call('{command}'): add it to WRITE_COMMANDS or READ_COMMANDS"
                if command in WRITE_COMMANDS:
                    for key in (args[1:] if command == "DEL" else args[1:2]):
                        keys, params = self.keys_of(key)
                        self.writes |= keys
                        self.key_params |= params
            elif name in functions and functions[name] is not self:
                callee = functions[name]
                self.writes |= callee.writes
                for position in callee.key_params:
                    if position < len(args):
                        keys, params = self.keys_of(args[position])
                        self.writes |= keys
                        self.key_params |= params
        return (len(self.writes), len(self.key_params)) != before


def functions_of(code: str) -> tuple[dict[str, Function], str]:
    """The top-level functions of ``code`` (comments blanked), and the rest of it."""
    functions, rest, last = {}, [], 0
    for match in _FUNCTION.finditer(code):
        if match.group(1):
            continue  # a function within a function: part of its text
        end = re.compile(r"^end\b", re.MULTILINE).search(code, match.end())
        assert end, f"no end for {match.group(2)}"
        params = [p.strip() for p in match.group(3).split(",") if p.strip()]
        functions[match.group(2)] = Function(match.group(2), params, code[match.end():end.end()])
        rest.append(code[last:match.start()])
        last = end.end()
    rest.append(code[last:])
    return functions, "".join(rest)


def written_keys(name: str) -> set[str]:
    """The bundle keys the script ``name`` writes, in its body and in the prelude functions it calls."""
    text = (LUA / f"{name}.lua").read_text()
    first = text.split("\n", 1)[0]
    preludes = []
    if first.startswith("--#include "):
        included = first.split()[1:]
        preludes = ["_common.lua", *(f"_{n}.lua" for n in ("node", "job") if n in included)]
        if len(included) > 1:
            preludes.append("_nodejob.lua")
    functions: dict[str, Function] = {}
    for prelude in preludes:
        functions.update(functions_of(without_comments((LUA / prelude).read_text()))[0])
    own, top = functions_of(without_comments(text))
    functions.update(own)
    script = Function(f"{name} (top level)", [], top)
    everything = [*functions.values(), script]
    while any([f.step(functions) for f in everything]):
        pass
    return script.writes


def declared_keys(name: str) -> set[str] | None:
    """The bundle keys the header of ``name`` lists in its ``-- Writes:`` entry (which may go
    on over lines indented further), or None when it has none."""
    lines = (LUA / f"{name}.lua").read_text().split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("-- Writes:")]
    if not starts:
        return None
    entry = [lines[starts[0]]]
    for line in lines[starts[0] + 1:]:
        if not re.match(r"--\s{2,}\S", line):
            break
        entry.append(line)
    return set(re.findall(r"K\[status\]|[KJ]\.\w+", " ".join(entry)))


@pytest.mark.parametrize("name", sorted(script_sources()))
def test_each_script_header_lists_the_bundle_keys_it_writes(name: str) -> None:
    declared = declared_keys(name)
    assert declared is not None, f"lua/{name}.lua: its header has no '-- Writes:' line"
    written = written_keys(name)
    finished = {key for key in declared if key.startswith("J.finished_")}
    assert finished <= {"J.finished_succeeded", "J.finished_failed", "J.finished_cancelled"}
    assert bool(finished) == (FINISHED in written), f"lua/{name}.lua: J.finished_<state> keys"
    listed, found = declared - finished, written - {FINISHED}
    assert listed == found, (f"lua/{name}.lua: Writes lists {sorted(listed - found)} it does not write, and "
                             f"misses {sorted(found - listed)}")


def test_the_write_check_follows_calls_and_key_arguments() -> None:
    code = without_comments("""
local function put(key, value)
  redis.call('RPUSH', key, value)  -- writes its first argument
end
local function relay(target)
  put(target, 1)
  redis.call('HGET', K.node, 'x')
end
local function unused()
  redis.call('DEL', K.other)
end
for _, key in ipairs({K.a, K.b}) do redis.call('SREM', key, 1) end
for _, key in ipairs({K.c}) do redis.call('ZREM', key, 1) end
relay(K.queue)
redis.call('DEL', K.node, J.job)
""")
    functions, top = functions_of(code)
    script = Function("top", [], top)
    while any([f.step(functions) for f in [*functions.values(), script]]):
        pass
    assert functions["put"].key_params == {0} and functions["relay"].key_params == {0}
    assert script.writes == {"K.queue", "K.node", "J.job", "K.a", "K.b", "K.c"}


def test_a_constant_is_written_in_and_a_misspelt_one_refused_at_load() -> None:
    assert inline_lua_constants("if s == NodeStatus.READY then close(CloseCode.SUPERSEDED) end") == \
        "if s == 'ready' then close(4001) end"
    with pytest.raises(ValueError, match="NodeStatus has no member READDY"):
        inline_lua_constants("return NodeStatus.READDY")
