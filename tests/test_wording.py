"""dispatcher/wording.py alone: counts and times as every text a person reads says them."""

from __future__ import annotations

import pytest

from dispatcher.wording import ago, duration, plural, seconds_since


def test_plural_agrees_with_the_count() -> None:
    assert [plural(n, "job") for n in (0, 1, 2)] == ["0 jobs", "1 job", "2 jobs"]
    assert plural(1, "process", "processes") == "1 process" and plural(3, "process", "processes") == "3 processes"


@pytest.mark.parametrize(("seconds", "long", "compact"), [
    (None, "-", "-"),
    (-3, "under 1 s", "0s"),
    (0.4, "under 1 s", "0s"),
    (1, "1 s", "1s"),
    (59.9, "59 s", "59s"),
    (60, "1 min", "1m"),
    (119, "1 min", "1m"),
    (3600 * 2 + 59, "2 h", "2h"),
    (86400 * 3, "3 d", "3d"),
])
def test_durations_round_down_to_the_largest_unit(seconds: float | None, long: str, compact: str) -> None:
    assert (duration(seconds), duration(seconds, compact=True)) == (long, compact)


def test_ago_never_says_zero_seconds_ago() -> None:
    assert [ago(s) for s in (None, 0, 0.99, 1, 125)] == ["never", "just now", "just now", "1 s ago", "2 min ago"]


def test_an_age_from_any_stored_time() -> None:
    """The page shows an age for what a record holds, whatever it holds."""
    assert seconds_since(1_000, 61_000) == 60.0
    assert [seconds_since(t, 61_000) for t in (None, "5", True, 10**400)] == [None] * 4
    assert ago(seconds_since(10**400, 61_000)) == "never"
