"""Equality of parsed JSON values, used to tell a retried `send` from an id reused for another message."""

from __future__ import annotations


def json_equal(left: object, right: object) -> bool:
    """Tell whether two parsed JSON values are equal as JSON values.

    Object key order does not matter and array order does. Numbers compare by value, so `1` equals
    `1.0`, as PostgreSQL 15's jsonb equality also does. Unlike Python's `==`, a boolean never equals a number.
    """
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right

    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right

    if isinstance(left, list):
        if not isinstance(right, list) or len(left) != len(right):
            return False
        return all(json_equal(a, b) for a, b in zip(left, right, strict=True))

    if isinstance(left, dict):
        if not isinstance(right, dict) or left.keys() != right.keys():
            return False
        return all(json_equal(value, right[key]) for key, value in left.items())

    if left is None or isinstance(left, str):
        return type(left) is type(right) and left == right

    return False
