"""The closing table of ``specmesh run`` / ``specmesh demo``: every cell follows from the runs' own
figures, computed by hand here from made-up statistics."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from specmesh.cluster.compare import BASELINE, Run, summarise
from specmesh.cluster.report import COLUMNS, summary_rows, summary_table
from specmesh.runtime.api import GenerationResult
from specmesh.runtime.config import SpecConfig
from specmesh.runtime.stats import RoundRecord, SessionStats


def _run(prompt: str, variant: str, *, tokens: int, wall_s: float, rounds: int, accepted: int, drafted: int,
         first_committed: int, first_ms: float, up: int, down: int, output: list[int]) -> Run:
    stats = SessionStats(prompt_tokens=3, generated_tokens=tokens, rounds=rounds, drafted=drafted, accepted=accepted,
                         wall_s=wall_s, bytes_up=up, bytes_down=down,
                         records=[RoundRecord(round=1, gamma=0, accepted=0, committed=first_committed,
                                              wall_ms=first_ms)])
    return Run(prompt, variant, GenerationResult([1, 2, 3], output, None, "length", stats))


SAME, OTHER = list(range(10)), list(range(1, 11))
RUNS = [
    # p1: target-only 10 tokens in 2 s (5 tok/s); decode after a 0.5 s first round: 9 / 1.5 = 6 tok/s
    _run("p1", BASELINE.label, tokens=10, wall_s=2.0, rounds=10, accepted=0, drafted=0, first_committed=1,
         first_ms=500, up=300, down=200, output=SAME),
    # p1: SpecMesh twice as fast; decode (10 - 3) / (1.0 - 0.2) = 8.75 tok/s
    _run("p1", "specmesh", tokens=10, wall_s=1.0, rounds=4, accepted=6, drafted=12, first_committed=3,
         first_ms=200, up=400, down=100, output=SAME),
    # p2: a slow baseline, and a SpecMesh output that differs
    _run("p2", BASELINE.label, tokens=10, wall_s=8.0, rounds=10, accepted=0, drafted=0, first_committed=1,
         first_ms=1000, up=300, down=200, output=SAME),
    _run("p2", "specmesh", tokens=10, wall_s=2.0, rounds=5, accepted=5, drafted=20, first_committed=2,
         first_ms=400, up=600, down=100, output=OTHER),
    # the dense variant on p1 alone: compared with the baseline on p1 alone (10 / 4 s vs 5 tok/s = 0.5x)
    _run("p1", "dense", tokens=10, wall_s=4.0, rounds=4, accepted=6, drafted=12, first_committed=3,
         first_ms=200, up=9000, down=100, output=SAME),
]


def test_summary_rows_follow_from_the_runs():
    rows = {row[0]: dict(zip(COLUMNS, row)) for row in summary_rows(RUNS)}
    base, spec, dense = rows[BASELINE.label], rows["specmesh"], rows["dense"]
    # target-only: 20 tokens in 10 s; decode 18 tokens in 8.5 s; the baseline is not compared with itself
    assert base == {"variant": "target-only", "tokens": "20", "tok/s": "2.00", "speedup": "1.00x",
                    "decode tok/s": "2.12", "decode speedup": "1.00x", "mean acc. len": "1.00",
                    "acceptance": "-", "up B/tok": "30", "down B/tok": "20", "same output": "-"}
    # SpecMesh: 20 tokens in 3 s = 6.67 tok/s = 3.33x; decode 15 tokens in 2.4 s = 6.25 tok/s = 2.95x;
    # (11 accepted + 9 rounds) / 9 rounds = 2.22; 11 / 32 drafted = 0.34; p2's output differs
    assert spec == {"variant": "specmesh", "tokens": "20", "tok/s": "6.67", "speedup": "3.33x",
                    "decode tok/s": "6.25", "decode speedup": "2.95x", "mean acc. len": "2.22",
                    "acceptance": "0.34", "up B/tok": "50", "down B/tok": "10", "same output": "no"}
    # dense on p1 only: 2.5 tok/s against the baseline's 5 on p1 (not 2 over both prompts)
    assert dense["tok/s"] == "2.50" and dense["speedup"] == "0.50x" and dense["same output"] == "yes"
    assert dense["decode speedup"] == f"{(7 / 3.8) / 6:.2f}x" and dense["up B/tok"] == "900"


def test_summaries_are_unrounded_ratios_of_totals():
    by = {s.variant: s for s in summarise(RUNS)}
    assert by["specmesh"].speedup == pytest.approx((20 / 3) / (20 / 10), rel=1e-12)
    assert by["specmesh"].decode_speedup == pytest.approx((15 / 2.4) / (18 / 8.5), rel=1e-12)
    assert by["specmesh"].mean_accepted_length == pytest.approx(20 / 9, rel=1e-12)
    assert by["dense"].speedup == pytest.approx(2.5 / 5.0, rel=1e-12)


def test_without_a_baseline_ratios_and_identity_are_blank():
    rows = summary_rows([r for r in RUNS if r.variant == "specmesh"])
    row = dict(zip(COLUMNS, rows[0]))
    assert (row["speedup"], row["decode speedup"], row["same output"]) == ("-", "-", "-")
    assert row["tok/s"] == "6.67"


def test_summary_table_names_its_context():
    cfg = SpecConfig(target="tiny", draft="tiny-draft", backend="inproc", num_stages=2)
    table = summary_table(RUNS, cfg, "device->edge1 20ms/inf")
    assert [c.header for c in table.columns] == list(COLUMNS)
    console = Console(file=io.StringIO(), width=250)
    console.print(table)
    text = console.file.getvalue()
    assert "inproc, 2 stages, device->edge1 20ms/inf" in text and "3.33x" in text
