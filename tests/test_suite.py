"""The suite's own split: ``-m "not slow"`` is the fast loop, and stays one."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.support import ROOT


def test_a_fast_test_that_starts_a_process_fails_naming_itself() -> None:
    with pytest.raises(RuntimeError, match=r"test_suite\.py::test_a_fast.* starts true: mark it @pytest.mark.slow"):
        subprocess.run(["true"], check=True)


def test_a_test_asking_for_a_process_fixture_is_slow(request: pytest.FixtureRequest, logs_dir: Path) -> None:
    assert request.node.get_closest_marker("slow") is not None


def test_the_default_run_keeps_the_slow_tests() -> None:
    """CI runs ``scripts/test`` as it is: nothing may deselect the slow tests by default."""
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "-m" not in options["addopts"].split() and "slow" not in options["addopts"]
    assert "exec .venv/bin/python -m pytest \"$@\"" in (ROOT / "scripts" / "test").read_text()
