"""Reading what Redis stores, for every view: no stored text can make a view fail.

Records are written by the scripts from validated frames, but a view must not
trust that: an older version, an operator's HSET or a bug may leave "1e+17",
"abc" or half a JSON text behind, and one bad record must not take down
``/api/nodes``, the page, the CLI or the status ticker for every node.
"""

from __future__ import annotations

import json
import math
from typing import Any


def as_float(value: str | None) -> float | None:
    """A finite number, or None for anything else."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def as_int(value: str | None) -> int | None:
    """An integer (``"1e+17"`` included, as Lua writes large numbers), or None."""
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        number = as_float(value)
        return None if number is None else int(number)


def as_json(value: str | None, default: Any) -> Any:
    """Parsed JSON of the default's type, or the default."""
    if not value:
        return default
    try:
        parsed = json.loads(value)
    except ValueError:
        return default
    return parsed if isinstance(parsed, type(default)) else default
