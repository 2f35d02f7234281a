"""Reading a policy's parameters from the session's policy map, with errors that name key and value.

A policy map is ``{key: str | int | float | bool}`` (the session's options); each policy factory reads
only the keys it knows and ignores the others, so that one map can configure every policy at once.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

Scalar = str | int | float | bool
Options = Mapping[str, Scalar]


def read_float(options: Options, key: str, default: float, lo: float, hi: float,
               lo_open: bool = False) -> float:
    """``options[key]`` (or ``default``) as a float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} = {value!r}: must be a number in {_range(lo, hi, lo_open)}")
    value = float(value)
    if value < lo or value > hi or (lo_open and value == lo):
        raise ValueError(f"{key} = {value!r}: must be in {_range(lo, hi, lo_open)}")
    return value


def read_int(options: Options, key: str, default: int, lo: int, hi: int) -> int:
    """``options[key]`` (or ``default``) as an int in ``[lo, hi]`` (a float with no fraction is fine)."""
    value = options.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{key} = {value!r}: must be an integer in [{lo}, {hi}]")
    return value


def read_choice(options: Options, key: str, default: str, choices: Sequence[str]) -> str:
    """``options[key]`` (or ``default``), one of ``choices``."""
    value = options.get(key, default)
    if value not in choices:
        raise ValueError(f"{key} = {value!r}: must be one of {list(choices)}")
    return str(value)


def read_bool(options: Options, key: str, default: bool) -> bool:
    """``options[key]`` (or ``default``), a bool."""
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} = {value!r}: must be true or false")
    return value


def _range(lo: float, hi: float, lo_open: bool) -> str:
    return f"{'(' if lo_open else '['}{lo}, {hi}]"
