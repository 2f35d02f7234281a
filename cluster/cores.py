"""The CPU cores a topology node owns: ``cores = [0, 1]`` or ``cores = "0-1"`` in a ``[[nodes]]`` table.

A node that names its cores owns them: its actors are pinned there and run one torch thread per core
at most (torch threads spin, so a thread without a core of its own stalls its peers). Core ids are
the kernel's (those ``taskset`` and ``/sys/devices/system/cpu`` use). Whether this machine has them
is checked only where the layout is used (:func:`usable_cores`), so that one file can describe
machines other than the one that reads it.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterable

from .keypath import fail

# One item of a Linux cpu list ("3" or "0-3"); items are comma-separated: "0-1,4".
CPU_LIST_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
ACCEPTED = 'must be a list of distinct core ids >= 0 ([0, 1]) or a cpu list such as "0-1,4"'


def parse_cores(value: Any) -> tuple[int, ...]:
    """The core ids of a ``cores`` value, ascending.

    Args:
        value: a list (or tuple) of distinct non-negative integers, or a cpu-list string
            (``"0-1,4"``: ranges inclusive, as ``taskset -c`` reads them).

    Returns:
        The ids, sorted, each once.

    Raises:
        ValueError: ``cores = <value>: ...`` naming what is wrong (negative, repeated, reversed range,
            not an integer, empty).
    """
    if isinstance(value, str):
        ids = _parse_cpu_list(value)
    elif isinstance(value, (list, tuple)):
        ids = list(value)
        for core in ids:
            if isinstance(core, bool) or not isinstance(core, int) or core < 0:
                raise fail("cores", value, f"core {core!r} is not an integer >= 0; {ACCEPTED}")
    else:
        raise fail("cores", value, ACCEPTED)
    if not ids:
        raise fail("cores", value, f"names no core; {ACCEPTED} (leave cores out for no pinning)")
    seen: set[int] = set()
    for core in ids:
        if core in seen:
            raise fail("cores", value, f"core {core} listed twice; {ACCEPTED}")
        seen.add(core)
    return tuple(sorted(ids))


def _parse_cpu_list(text: str) -> list[int]:
    ids: list[int] = []
    for item in text.split(","):
        match = CPU_LIST_ITEM.match(item)
        if match is None:
            raise fail("cores", text, f"item {item.strip()!r} is not a core id or a range lo-hi; {ACCEPTED}")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise fail("cores", text, f"range {lo}-{hi} runs backwards; write it low-high")
        ids.extend(range(lo, hi + 1))
    return ids


def cpu_list(cores: Iterable[int]) -> str:
    """The compact cpu-list form of ``cores``: ``[0, 1, 2, 5]`` -> ``"0-2,5"`` (for messages and files)."""
    items: list[str] = []
    run: list[int] = []
    for core in sorted(set(cores)):
        if run and core == run[-1] + 1:
            run.append(core)
            continue
        if run:
            items.append(_item(run))
        run = [core]
    if run:
        items.append(_item(run))
    return ",".join(items)


def _item(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def usable_cores() -> frozenset[int]:
    """The cores this process may run on (its affinity mask; every core where the OS has no masks)."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))
