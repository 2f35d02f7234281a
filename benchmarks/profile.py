"""The round profile table of the ``specmesh bench`` report, from the raw runs of ``results.json``.

The same figures as ``specmesh run --profile`` (``specmesh.cluster.report.profile_rows``, from live
runs): per SpecMesh variant, summed over its runs, milliseconds per round of the draft's critical-path
compute, the stages' compute, the modelled links, the codec and the rest (Ray, driver, Python), the
round's limit (draft + stages + links: what the measured compute and links allow with no overhead),
limit / round time, and the share of proposals that reused speculated depths.
"""
from __future__ import annotations

from .tables import table

PROFILE_PARTS = ("draft", "stages", "links", "codec", "rest")  # the order of cluster/report.py
HEADER = ["variant", "rounds", "round", *PROFILE_PARTS, "limit", "limit/round time", "speculation hits"]
NONE = "-"


def profile_rows(runs: list[dict], prefix: str = "") -> list[list[str]]:
    """One row per SpecMesh variant of ``runs`` (rows of ``runner.run_record``; runs that drafted
    nothing, i.e. target-only and the transformers peer, are left out), labelled ``prefix + variant``."""
    totals: dict[str, dict[str, float]] = {}
    for run in runs:
        p = run.get("profile_ms")
        if p is None or not run.get("drafted"):
            continue
        t = totals.setdefault(run["variant"], {"rounds": 0.0, "proposals": 0.0, "hits": 0.0, **{k: 0.0 for k in p}})
        t["rounds"] += run["rounds"]
        t["proposals"] += run.get("proposals", 0)
        t["hits"] += run.get("proposals_hit", 0)
        for k, v in p.items():
            t[k] += v
    rows = []
    for variant, t in totals.items():
        per = lambda k: f"{t[k] / max(t['rounds'], 1):.1f}"  # noqa: E731
        eff = t["limit"] / t["wall"] if t["wall"] else 0.0
        hits = f"{t['hits'] / t['proposals']:.2f}" if t["proposals"] else NONE
        rows.append([prefix + variant, f"{t['rounds']:.0f}", per("wall"), *(per(k) for k in PROFILE_PARTS),
                     per("limit"), f"{eff:.2f}", hits])
    return rows


def profile_lines(groups: list[tuple[str, list[dict]]]) -> list[str]:
    """The report's profile table over ``(label prefix, runs)`` groups (one per engine or point);
    nothing when no run carries a profile (a results file from before it was recorded)."""
    rows = [row for prefix, runs in groups for row in profile_rows(runs, prefix)]
    if not rows:
        return []
    return ["Where a SpecMesh round's time goes (ms per round, over every run of the variant; limit = "
            "draft + stages + links, the round time the measured compute and links allow with no "
            "overhead; speculation hits = proposals that reused depths drafted during the previous "
            "verification):", "", *table(HEADER, rows), ""]
