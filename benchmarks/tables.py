"""Markdown cells and tables of the ``specmesh bench`` report (shared by every section)."""
from __future__ import annotations


def fmt(s: dict | None, spec: str = ".2f", suffix: str = "") -> str:
    """A :func:`runner.stat` as ``mean (min..max)``, or just the mean when the range is a point."""
    if not s or s.get("mean") is None:
        return "-"
    mean = f"{s['mean']:{spec}}{suffix}"
    if f"{s['min']:{spec}}" == f"{s['max']:{spec}}":
        return mean
    return f"{mean} ({s['min']:{spec}}..{s['max']:{spec}})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.0f} s ({s / 60:.1f} min)"
