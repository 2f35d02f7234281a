"""The lengths replay: traces and costs from recorded rounds, and the shipped policies served on them."""
from __future__ import annotations

import random

import pytest

from specmesh.benchmarks.length_replay import (
    Round, RoundCosts, impute, replay, replay_point, rounds_of, trace_of,
)
from specmesh.benchmarks.runner import run_record
from specmesh.cluster.compare import Run
from specmesh.runtime import SpecConfig, SpecMesh

PROMPTS = {"a": [5, 17, 42, 99, 3, 250, 7, 7, 128, 64], "b": [1, 2, 3, 200, 31, 77, 8, 90, 14, 6]}
TOKENS = 40
VARIANTS = [("fixed gamma=1", {"draft_length": "fixed", "gamma": 1}),
            ("fixed gamma=3", {"draft_length": "fixed", "gamma": 3}),
            ("fixed gamma=6", {"draft_length": "fixed", "gamma": 6}),
            ("heuristic", {"draft_length": "heuristic"}), ("online", {"draft_length": "online"})]


def test_trace_of_hand_built_rounds():
    # 9 tokens: round 1 keeps 2 of 3 (miss at 2), round 2 keeps 3 of 3 (bonus at 6 unseen),
    # round 3 keeps 0 of 2 (miss at 7), the last commits the 9th token alone.
    rounds = [Round(3, 2, 3, 1.0), Round(3, 3, 4, 1.0), Round(2, 0, 1, 1.0), Round(0, 0, 1, 1.0)]
    seen, conflicts = trace_of([rounds], 9)
    assert seen == [True, True, False, True, True, True, None, False, None] and conflicts == 0
    other = [Round(8, 6, 7, 1.0), Round(1, 0, 1, 1.0), Round(0, 0, 1, 1.0)]  # 0-5 kept, 6 (the bonus above) and 7 missed
    seen, conflicts = trace_of([rounds, other], 9)
    assert seen[6] is False and seen[7] is False and conflicts == 1  # position 2: kept here, missed above
    with pytest.raises(ValueError, match="commit 5 tokens, not the output's 9"):
        trace_of([[Round(4, 4, 5, 1.0)]], 9)
    filled, n = impute([True, None, True, True, False, None])
    assert n == 2 and filled == [True, True, True, True, False, True]


def test_costs_use_medians_where_measured_and_the_fit_elsewhere():
    sessions = [[Round(4, 0, 1, 9.0)] + [Round(4, 2, 3, 1.0 + 0.01 * i, 0.4, 0.5) for i in range(5)]
                + [Round(8, 2, 3, 2.0, 0.8, 1.0)] * 5 + [Round(2, 1, 2, 5.0, 0.2, 0.3)]]  # a stall at 2
    costs = RoundCosts.of(sessions)
    assert costs.prefill == 9.0 and costs.median[4] == pytest.approx(1.02) and costs.median[8] == 2.0
    assert 2 not in costs.median and costs.wall(2) == pytest.approx(costs.fit[0] + 2 * costs.fit[1])
    assert costs.draft_per_token == pytest.approx(0.1)
    obs = costs.observe(4, 3, 1.0)
    assert (obs.drafted, obs.accepted, obs.round_s, obs.draft_s_per_token) == (4, 3, 1.0, 0.1)
    with pytest.raises(ValueError, match="two draft lengths"):
        RoundCosts.of([[Round(4, 0, 1, 9.0), Round(4, 1, 2, 1.0)]])


def test_replay_on_a_hand_built_trace():
    costs = RoundCosts({1: 1.0, 2: 1.5}, (0.5, 0.5), 0.1, 0.5, (1.0,), 3.0)
    trace = [True, True, False, True, True]  # gamma 2: rounds keep 2 (3 tokens), then 2 of the last 2
    out = replay("fixed", {"gamma": 2}, [trace], costs, start_gamma=4, max_new_tokens=100)
    assert (out.tokens, out.rounds, out.drafted) == (5, 2, 4) and out.seconds == 3.0 + 1.5
    capped = replay("fixed", {"gamma": 2}, [trace], costs, start_gamma=4, max_new_tokens=5)
    assert capped.drafted == 2 + 1  # the second round is capped at max_new_tokens - 3 - 1 = 1 draft
    warm = replay("fixed", {"gamma": 2}, [trace, trace], costs, start_gamma=4, max_new_tokens=100,
                  sessions_before=1)
    assert (warm.tokens, warm.rounds) == (5, 2)


@pytest.fixture(scope="module")
def point(tmp_path_factory):
    """A lengths point of live runs on the tiny pair (a noisy draft, greedy), as the bench records it."""
    cfg = SpecConfig(target="tiny", draft="tiny-draft:noise=0.02", dtype="float32", num_stages=1, gamma=2,
                     cache_dir=str(tmp_path_factory.mktemp("models")), max_new_tokens=TOKENS)
    rows = []
    with SpecMesh(cfg) as engine:
        for label, over in VARIANTS:
            for pid, prompt in PROMPTS.items():
                rows.append(run_record(Run(pid, label, engine.generate(prompt, **over)), 0, None))
    return {"runs": rows, "variants": [{"label": lab, "overrides": over} for lab, over in VARIANTS]}


def test_replay_reproduces_the_live_rounds_of_every_policy_that_ignores_the_clock(point):
    """The trace of every run together and the shipped policy classes give back each live static
    and heuristic run round by round (their choices depend on acceptance alone)."""
    runs = point["runs"]
    traces = []
    for pid in PROMPTS:
        mine = [r for r in runs if r["prompt_id"] == pid]
        assert all(r["output_ids"] == mine[0]["output_ids"] for r in mine)  # lossless: one greedy output
        seen, conflicts = trace_of([rounds_of(r) for r in mine], len(mine[0]["output_ids"]))
        assert conflicts == 0  # float32: the cuts of the draft's forwards agree on every position
        traces.append(impute(seen)[0])
    costs = RoundCosts.of(rounds_of(r) for r in runs)
    for label, over in VARIANTS[:4]:
        live = [r for r in runs if r["variant"] == label]
        options = {"gamma": over["gamma"]} if "gamma" in over else {}
        out = replay(over["draft_length"], options, traces, costs, start_gamma=2, max_new_tokens=TOKENS,
                     rng=random.Random(0))
        assert out.rounds == sum(r["rounds"] for r in live), label
        assert out.drafted == sum(r["drafted"] for r in live), label
        assert out.tokens == sum(r["tokens"] for r in live), label


def test_replay_point_compares_every_variant_to_the_best_static(point):
    rep = replay_point(point, max_new_tokens=TOKENS, start_gamma=2, seeds=3)
    statics = [lab for lab, over in VARIANTS if over["draft_length"] == "fixed"]
    assert rep["best"] in statics and rep["vs_best_static"][rep["best"]]["mean"] == 1.0
    assert max(rep["vs_best_static"][lab]["mean"] for lab in statics) == 1.0
    assert set(rep["tokens_per_s"]) == {lab for lab, _ in VARIANTS}
    online = rep["vs_best_static"]["online"]
    assert 0 < online["min"] <= online["mean"] <= online["max"]
    assert rep["positions"] == sum(len(r["output_ids"]) for r in point["runs"][:2]) and rep["excluded_runs"] == 0
    sampled = {**point, "variants": [{**v, "overrides": {**v["overrides"], "temperature": 0.7}}
                                     for v in point["variants"]]}
    assert replay_point(sampled, max_new_tokens=TOKENS, start_gamma=2) is None
