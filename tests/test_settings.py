"""Configuration: contract defaults, the TOML file, DISPATCHER_* variables, clear errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dispatcher.errors import ConfigError
from dispatcher.settings import load_settings
from tests.support import PYTHON, ROOT, clean_env


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
    with pytest.raises(ConfigError, match="missing.toml"):
        load_settings()


@pytest.mark.parametrize(("toml", "env", "named"), [
    ("[scheduler.node_health]\nheartbeat_timout_seconds = 3\n", {}, "heartbeat_timout_seconds"),
    ("[scheduler.node_health]\nheartbeat_timeout_seconds = 'soon'\n", {}, "heartbeat_timeout_seconds"),
    ("", {"DISPATCHER_FAILURE_RATE_THRESHOLD": "9"}, "failure_rate_threshold"),
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


def test_celeryconfig_takes_its_values_from_the_settings(tmp_path: Path) -> None:
    env = clean_env("redis://127.0.0.1:6390/3", periodic_scan_interval_seconds=2.5, redis_max_connections=7)
    code = ("import celeryconfig as c, json; print(json.dumps([c.broker_url, c.result_backend,"
            " c.beat_schedule['scan-nodes']['schedule'], c.redis_max_connections]))")
    out = subprocess.run([PYTHON, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == ["redis://127.0.0.1:6390/3", "redis://127.0.0.1:6390/3", 2.5, 7]


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
