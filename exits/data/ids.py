"""COCO ids are integers: the one rule for reading an id from json.

JSON has one number type, so ``5.0`` is accepted as 5 (an earlier reader did the same and
run outputs depend on it). Everything else is not an id: strings (``"1"`` would collide
with 1 in a dict keyed by the parsed id), bools (``True == 1`` in Python), floats with a
fraction, and integers outside int64 (Parquet's id columns).
"""
from __future__ import annotations

from typing import Any

__all__ = ["INT64_MIN", "INT64_MAX", "as_int_id"]

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def as_int_id(value: Any) -> int | None:
    """``value`` as an int id, or None when it is not an integer id (see module doc)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not value.is_integer():
            return None
        value = int(value)
    if not isinstance(value, int) or not INT64_MIN <= value <= INT64_MAX:
        return None
    return value
