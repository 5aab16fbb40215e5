"""dispatcher/records.py alone: what a view reads from a stored record, whatever was stored."""

from __future__ import annotations

from dispatcher.records import as_float, as_int, as_json


def test_numbers_as_lua_and_operators_leave_them() -> None:
    assert [as_float(v) for v in ("12.5", "1e+17", "", None, "abc", "NaN", "inf")] == [
        12.5, 1e17, None, None, None, None, None]
    assert [as_int(v) for v in ("42", "1e+17", "2.9", "", None, "soon")] == [42, 10**17, 2, None, None, None]


def test_json_of_the_expected_type_or_the_default() -> None:
    assert as_json('{"zone": "eu"}', {}) == {"zone": "eu"}
    assert as_json("[1, 2]", {}) == {}, "a list where a dict belongs"
    assert as_json("{not json", []) == [] and as_json(None, []) == [] and as_json("", {}) == {}
