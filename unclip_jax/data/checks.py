"""Argument checks shared by the data modules."""
from __future__ import annotations

import operator


def checked_int(name: str, value, minimum: int = 0) -> int:
    """`value` as an int >= `minimum`; bools, floats, strings, ... raise a ValueError naming `name`."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value
