"""A worker process's memory: its resident size and peak, handing freed pages back, and the
lines that report them beside the weight formats that ran."""
from __future__ import annotations

import ctypes
import os


def release_freed_memory() -> None:
    """Hands the heap's freed pages back to the system (glibc keeps a freed layer's pages otherwise,
    and the dense weights just replaced would still count in the worker's resident memory)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def resident_bytes() -> int:
    """This process's resident memory (bytes), from ``/proc/self/statm``; 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def peak_resident_bytes() -> int:
    """This process's peak resident memory so far (bytes, ``VmHWM``); 0 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, IndexError, ValueError):
        return 0


def formats_line(counts: dict[str, int]) -> str:
    """``int8 x196, dense x1``: the weight formats that ran (``StageModel.formats``), most used first."""
    return ", ".join(f"{f} x{n}" for f, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "dense"


def describe_workers(workers: list[dict]) -> list[str]:
    """One line per worker: its role, the weight formats it computes in, its resident memory."""
    lines = []
    for w in workers:
        mem = f"{w['rss_bytes'] / 1e9:.2f} GB resident" if w.get("rss_bytes") else "memory unknown"
        if w.get("peak_rss_bytes"):
            mem += f" (peak {w['peak_rss_bytes'] / 1e9:.2f} GB)"
        where = f"pid {w['pid']}" if "pid" in w else ""
        lines.append(f"{w.get('role', '?')}: {formats_line(w.get('formats') or {})}; {mem}; {where}".rstrip("; "))
    return lines


def memory_total(workers: list[dict]) -> str:
    """The resident memory of every process that holds workers, this one (the driver) included:
    now and the sum of each process's peak (processes are counted once, by pid)."""
    procs = {os.getpid(): (resident_bytes(), peak_resident_bytes())}
    for w in workers:
        procs.setdefault(w.get("pid"), (w.get("rss_bytes", 0), w.get("peak_rss_bytes", 0)))
    now, peak = (sum(v[i] for v in procs.values()) for i in (0, 1))
    return f"all {len(procs)} process(es): {now / 1e9:.2f} GB resident, peaks summed {peak / 1e9:.2f} GB"
