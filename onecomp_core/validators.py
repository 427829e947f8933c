"""attrs validators for component ``Options`` whose errors name the option."""
from __future__ import annotations


def in_range(lo=None, hi=None):
    def check(inst, attr, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"option {attr.name!r} must be a number, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"option {attr.name!r} must be in [{lo}, {hi}], got {value}")
    return check


def positive(inst, attr, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"option {attr.name!r} must be a positive number, got {value!r}")


def one_of(*options):
    def check(inst, attr, value):
        if value not in options:
            raise ValueError(f"option {attr.name!r} must be one of {', '.join(map(str, options))}, got {value!r}")
    return check


def boolean(inst, attr, value):
    if not isinstance(value, bool):
        raise ValueError(f"option {attr.name!r} must be true or false, got {value!r}")
