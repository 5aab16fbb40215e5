"""Configuration: contract defaults, the TOML file, DISPATCHER_* variables, clear errors."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from dispatcher.errors import ConfigError
from dispatcher.settings import load_settings, unknown_variables
from tests.support import PYTHON, ROOT, clean_env, procfile_command


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("DISPATCHER_") or name in ("REDIS_URL", "PORT"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_are_the_contracts() -> None:
    s = load_settings()
    assert (s.heartbeat_interval_seconds, s.heartbeat_timeout_seconds, s.warmup_timeout_seconds) == (15, 45, 60)
    assert (s.health_check_success_threshold, s.failure_rate_window_size, s.failure_rate_threshold,
            s.consecutive_failure_threshold, s.periodic_scan_interval_seconds) == (3, 5, 3, 3, 30)
    assert s.required_models == [] and s.require_gpu is True and s.resource_threshold_percent == 25
    assert s.max_message_bytes == 1024 * 1024 and s.registration_tokens == [] and s.admin_token is None
    assert s.reassign_grace_seconds == 45, "the grace defaults to the heartbeat timeout"
    assert (s.job_failures_consecutive, s.job_failures_in_window, s.job_failures_window) == (5, 7, 10)


def test_toml_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.toml").write_text(
        "[scheduler.node_health]\nheartbeat_timeout_seconds = 20\nwarmup_timeout_seconds = 90\n"
        'required_models = ["whisper"]\n[scheduler.dispatch]\nresource_threshold_percent = 50\n'
        '[server]\nregistration_tokens = ["t1"]\n')
    monkeypatch.setenv("DISPATCHER_HEARTBEAT_TIMEOUT_SECONDS", "0.5")
    monkeypatch.setenv("DISPATCHER_REQUIRED_MODELS", '["whisper-large-v3", "nllb"]')
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("PORT", "5050")
    s = load_settings()
    assert s.heartbeat_timeout_seconds == 0.5, "the environment wins over the file"
    assert s.warmup_timeout_seconds == 90 and s.resource_threshold_percent == 50
    assert s.required_models == ["whisper-large-v3", "nllb"]
    assert [t.get_secret_value() for t in s.registration_tokens] == ["t1"]
    assert (s.redis_url, s.port) == ("redis://example:6380/2", 5050)


def test_config_file_named_by_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "elsewhere.toml"
    path.write_text("[scheduler.node_health]\nrequire_gpu = false\n")
    monkeypatch.setenv("DISPATCHER_CONFIG", str(path))
    assert load_settings().require_gpu is False
    monkeypatch.setenv("DISPATCHER_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_settings()


@pytest.mark.parametrize(("toml", "env", "named"), [
    ("[scheduler.node_health]\nheartbeat_timout_seconds = 3\n", {}, "heartbeat_timout_seconds"),
    ("[scheduler.node_health]\nheartbeat_timeout_seconds = 'soon'\n", {}, "heartbeat_timeout_seconds"),
    ("", {"DISPATCHER_FAILURE_RATE_THRESHOLD": "9"}, "failure_rate_threshold"),
    ("", {"DISPATCHER_JOB_FAILURES_IN_WINDOW": "11"}, "job_failures_in_window must not exceed job_failures_window"),
    ("", {"DISPATCHER_JOB_FAILURES_CONSECUTIVE": "11"}, "job_failures_consecutive must not exceed"),
    ("[scheduler.node_health]\njob_failures_window = 65\n", {}, "job_failures_window"),
    ("", {"DISPATCHER_REQUIRED_MODELS": "whisper"}, "required_models"),
    ("[scheduler.node_health\n", {}, "config.toml"),
])
def test_bad_configuration_is_refused_with_the_key_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        toml: str, env: dict[str, str], named: str) -> None:
    (tmp_path / "config.toml").write_text(toml)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=named):
        load_settings()


@pytest.mark.parametrize(("toml", "message"), [
    ("[scheduler.node_healthh]\nheartbeat_timeout_seconds = 3\n",
     "unknown key scheduler.node_healthh.heartbeat_timeout_seconds; did you mean [scheduler.node_health]?"),
    ("[schedular.node_health]\nrequire_gpu = false\n",
     "unknown key schedular.node_health.require_gpu; did you mean [scheduler.node_health]?"),
    ("[scheduler.dispatch]\nheartbeat_timeout_seconds = 3\n",
     "key `heartbeat_timeout_seconds` belongs in [scheduler.node_health], not [scheduler.dispatch]"),
    ("[scheduler]\nadmin_token = 'x'\n", "key `admin_token` belongs in [server], not [scheduler]"),
    ("key_prefix = '{d}'\n", "key `key_prefix` belongs in [redis], not the top level"),
    ("debug = true\n", "unknown key debug"),
    ("[sever]\n", "unknown table [sever]; did you mean [server]?"),
    ("[sever]\nworkers = 2\n", "unknown key sever.workers; did you mean [server]?"),
    ("[server]\nadmin_tokn = 'x'\n", "unknown key server.admin_tokn; did you mean `admin_token`?"),
    ("[server]\nkey_prefx = 'x'\n", "unknown key server.key_prefx; did you mean `key_prefix` in [redis]?"),
    ("[redis]\nredis_url = 'redis://x'\n", "key `redis_url` is not read from the file: set REDIS_URL"),
    ("server = 1\n", "[server] must be a table, not a value"),
])
def test_a_key_out_of_place_is_refused_with_its_right_place(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "config.toml").write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(f"config.toml: {message}")):
        load_settings()


def test_every_key_out_of_place_is_named_at_once(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        "[server]\nadmin_tokn = 'x'\nlog_level = 'DEBUG'\n[scheduler.node_healthh]\nrequire_gpu = false\n")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "server.admin_tokn" in str(raised.value) and "scheduler.node_healthh.require_gpu" in str(raised.value)
    assert "log_level" not in str(raised.value), "a key in its place is not a problem"


@pytest.mark.parametrize(("variable", "message"), [
    ("DISPATCHER_ADMIN_TOKN",
     "unknown environment variable DISPATCHER_ADMIN_TOKN; did you mean DISPATCHER_ADMIN_TOKEN?"),
    ("DISPATCHER_HEARTBEAT_TIMOUT_SECONDS", "did you mean DISPATCHER_HEARTBEAT_TIMEOUT_SECONDS?"),
    ("DISPATCHER_PORT", "unknown environment variable DISPATCHER_PORT; did you mean PORT?"),
    ("DISPATCHER_WHATEVER", "unknown environment variable DISPATCHER_WHATEVER"),
])
def test_an_unknown_dispatcher_variable_is_refused(monkeypatch: pytest.MonkeyPatch, variable: str,
                                                  message: str) -> None:
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings()


def test_variables_are_matched_as_the_settings_read_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Case-insensitively, and through the platform names of the unprefixed settings."""
    monkeypatch.setenv("dispatcher_require_gpu", "false")
    monkeypatch.setenv("DISPATCHER_REDIS_URL", "redis://example:6380/1")
    settings = load_settings()
    assert settings.require_gpu is False and settings.redis_url == "redis://example:6380/1"


def test_the_variables_of_the_cli_and_the_agent_are_not_refused() -> None:
    """They share the servers' environment in a local run and on a platform: a server
    process refusing them would not start beside an agent."""
    sources = [ROOT / "dispatcher" / "cli.py", ROOT / "dispatcher" / "localrun" / "run.py",
               *(ROOT / "dispatcher" / "agent").glob("*.py")]
    read = {name for path in sources for name in re.findall(r"\bDISPATCHER_[A-Z_]*[A-Z]\b", path.read_text())}
    assert {"DISPATCHER_URL", "DISPATCHER_NODE_URL", "DISPATCHER_REGISTRATION_TOKEN"} <= read
    assert unknown_variables({name: "x" for name in read}) == []


@pytest.mark.slow
@pytest.mark.parametrize(("process", "toml", "env", "named"), [
    ("worker", "[scheduler.node_healthh]\nheartbeat_timeout_seconds = 3\n", {},
     "unknown key scheduler.node_healthh.heartbeat_timeout_seconds; did you mean [scheduler.node_health]?"),
    ("web", "[scheduler.dispatch]\nrequire_gpu = false\n", {},
     "key `require_gpu` belongs in [scheduler.node_health], not [scheduler.dispatch]"),
    ("beat", "", {"DISPATCHER_PERIODIC_SCAN_INTERVAL": "5"},
     "unknown environment variable DISPATCHER_PERIODIC_SCAN_INTERVAL; did you mean"),
])
def test_a_process_with_a_bad_configuration_stops_naming_the_key(tmp_path: Path, process: str, toml: str,
                                                                 env: dict[str, str], named: str) -> None:
    (tmp_path / "config.toml").write_text(toml)
    done = subprocess.run(["bash", "-c", f"exec {procfile_command(process)}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=20, env={**clean_env("redis://127.0.0.1:1/0"), **env})
    assert done.returncode != 0
    assert named in done.stdout + done.stderr


@pytest.mark.slow
def test_the_cli_says_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[sever]\nadmin_token = 'x'\n")
    done = subprocess.run([PYTHON, "-m", "dispatcher.cli", "submit", "--type", "t"], cwd=tmp_path, timeout=60,
                          capture_output=True, text=True, env=clean_env("redis://127.0.0.1:1/0"))
    assert (done.returncode, done.stderr) == (1, "dispatcher: config.toml: unknown key sever.admin_token; "
                                                 "did you mean [server]?\n")


@pytest.mark.slow
def test_celeryconfig_takes_its_values_from_the_settings(tmp_path: Path) -> None:
    env = clean_env("redis://127.0.0.1:6390/3", periodic_scan_interval_seconds=2.5, redis_max_connections=7)
    code = ("import celeryconfig as c, json; print(json.dumps([c.broker_url, c.result_backend,"
            " c.beat_schedule['scan-nodes']['schedule'], c.redis_max_connections]))")
    out = subprocess.run([PYTHON, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == ["redis://127.0.0.1:6390/3", "redis://127.0.0.1:6390/3", 2.5, 7]


@pytest.mark.slow
def test_scripts_load_from_any_working_folder(tmp_path: Path) -> None:
    code = "from dispatcher.scripts import script_sources; print(sorted(script_sources()))"
    out = subprocess.run([PYTHON, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env=clean_env("redis://127.0.0.1:1/0"))
    names = eval(out.stdout)  # noqa: S307 - our own subprocess's repr of a list of str
    assert {"register_node", "record_heartbeat", "expire_node", "pop_frames"} <= set(names)
    assert "_node" not in names
    assert sorted(names) == sorted(p.stem for p in (ROOT / "lua").glob("[!_]*.lua"))


def test_the_example_config_lists_every_key_with_its_default() -> None:
    from dispatcher.settings import SECTIONS, Settings, read_toml

    example = read_toml(ROOT / "config.example.toml")
    documented = {k for keys in SECTIONS.values() for k in keys}
    commented_out = {"job_reassign_grace_seconds", "admin_token"}
    assert set(example) | commented_out == documented
    assert set(Settings.model_fields) - {"redis_url", "port"} == documented
    assert load_settings(**example).model_dump() == load_settings().model_dump()
