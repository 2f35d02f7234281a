"""The lengths scenario's clock-noise-free figure: wall time refitted from rounds and drafted tokens."""
from __future__ import annotations

import pytest

from specmesh.benchmarks.lengths import modelled_rates


def _point(rows):
    variants = [{"label": "fixed gamma=4", "overrides": {"draft_length": "fixed", "gamma": 4}},
                {"label": "fixed gamma=8", "overrides": {"draft_length": "fixed", "gamma": 8}},
                {"label": "online", "overrides": {"draft_length": "online"}}]
    runs = [{"variant": v, "tokens": n, "rounds": r, "drafted": d, "wall_s": w} for v, n, r, d, w in rows]
    return {"variants": variants, "runs": runs}


def test_modelled_rates_take_the_clock_noise_out():
    cost = lambda r, d: 1.0 + 0.3 * r + 0.03 * d  # noqa: E731  the machine's true costs
    rows = [("fixed gamma=4", 100, 30, 120, cost(30, 120) * 1.2),  # a stall
            ("fixed gamma=4", 60, 18, 72, cost(18, 72) * 0.9),
            ("fixed gamma=8", 100, 22, 176, cost(22, 176)),
            ("fixed gamma=8", 60, 12, 96, cost(12, 96) * 1.1),
            ("online", 100, 24, 170, cost(24, 170) * 0.95),
            ("online", 60, 14, 100, cost(14, 100))]
    m = modelled_rates(_point(rows))
    rate = {v: sum(n for w, n, *_ in rows if w == v) / sum(cost(r, d) for w, _, r, d, _ in rows if w == v)
            for v in ("fixed gamma=4", "fixed gamma=8", "online")}
    best = max(("fixed gamma=4", "fixed gamma=8"), key=m["tokens_per_s"].get)
    assert m["best"] == best
    for v, r in m["vs_best_static"].items():
        assert r == pytest.approx(m["tokens_per_s"][v] / m["tokens_per_s"][best])
    exact = modelled_rates(_point([(v, n, r, d, cost(r, d)) for v, n, r, d, _ in rows]))  # no noise: exact
    assert exact["fit_s"] == pytest.approx({"per_run": 1.0, "per_round": 0.3, "per_drafted": 0.03})
    assert exact["tokens_per_s"] == pytest.approx(rate)
    assert modelled_rates(_point(rows[:2])) is None  # fewer runs than unknowns
