"""The round profile table of the ``specmesh bench`` report, from the raw runs of ``results.json``.

The same figures as ``specmesh run --profile`` (``specmesh.cluster.report.profile_rows``, from live
runs): per SpecMesh variant, summed over its runs, milliseconds per round of the draft's critical-path
compute, the stages' compute, the modelled links, the codec and the rest (Ray, driver, Python), the
round's limit (draft + stages + links: what the measured compute and links allow with no overhead),
limit / round time, and the share of proposals that reused speculated depths.
"""
from __future__ import annotations

from specmesh.cluster.report import PROFILE_HEADER, sum_profiles

from .tables import table

HEADER = list(PROFILE_HEADER)


def profile_rows(runs: list[dict], prefix: str = "") -> list[list[str]]:
    """One row per SpecMesh variant of ``runs`` (rows of ``runner.run_record``; runs that drafted
    nothing, i.e. target-only and the transformers peer, are left out), labelled ``prefix + variant``."""
    return sum_profiles(
        (prefix + run["variant"], run["profile_ms"], run["rounds"], run.get("proposals", 0),
         run.get("proposals_hit", 0))
        for run in runs if run.get("profile_ms") is not None and run.get("drafted")
    )


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
