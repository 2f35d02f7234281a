"""Adaptive draft-length policies start where the engine's last session of the same policy ended."""
from __future__ import annotations

import pytest

from specmesh.runtime import SpecConfig, SpecMesh

PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 128, 64]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = SpecConfig(target="tiny", draft="tiny", dtype="float32", num_stages=1,
                     cache_dir=str(tmp_path_factory.mktemp("models")), max_new_tokens=40, gamma=2)
    with SpecMesh(cfg) as e:
        yield e


def test_the_next_session_starts_at_the_last_sessions_gamma(engine):
    first = engine.generation(PROMPT, draft_length="heuristic")
    first.run()
    learned = first.session.gamma
    assert learned > 2  # the draft is the target: every round accepted, the heuristic climbed
    second = engine.generate(PROMPT, draft_length="heuristic")
    assert second.stats.records[0].gamma == learned
    assert second.output_ids == first.output_ids  # greedy: lossless whatever gamma does


def test_fixed_and_an_explicit_gamma_are_never_replaced(engine):
    engine.generate(PROMPT, draft_length="heuristic")
    assert engine.generate(PROMPT).stats.records[0].gamma == 2  # fixed keeps config.gamma
    assert engine.generate(PROMPT, draft_length="heuristic", gamma=3).stats.records[0].gamma == 3
    other = engine.generate(PROMPT, draft_length="online")
    assert other.stats.records[0].gamma == 2  # each policy learns its own


def test_online_and_tkslt_carry_their_estimates_not_just_the_gamma(engine):
    engine.forget_draft_lengths()
    for name in ("online", "tkslt"):
        first = engine.generation(PROMPT, draft_length=name)
        first.run()
        second = engine.generation(PROMPT, draft_length=name)
        mine, theirs = second.draft_length, first.draft_length
        assert mine is not theirs  # a copy: concurrent sessions do not share one policy
        assert second.session.gamma == theirs.gamma  # the incumbent, not a probe the last round played
        if name == "online":
            assert mine.keep() == theirs.keep() and mine.affine_time() == theirs.affine_time()
            assert mine.affine_time() is not None
        else:
            assert (mine.alpha, mine.costs()) == (theirs.alpha, theirs.costs())
        second.run()
        assert second.output_ids == first.output_ids


def test_other_sampling_or_options_and_forgetting_start_afresh(engine):
    engine.forget_draft_lengths()
    engine.generate(PROMPT, draft_length="online")
    assert engine.generation(PROMPT, draft_length="online").draft_length.affine_time() is not None
    assert engine.generation(PROMPT, draft_length="online", temperature=0.7).draft_length.affine_time() is None
    assert engine.generation(PROMPT, draft_length="online", policy_options={"max_gamma": 8}) \
        .draft_length.affine_time() is None
    engine.forget_draft_lengths()
    fresh = engine.generation(PROMPT, draft_length="online")
    assert fresh.draft_length.affine_time() is None and fresh.session.gamma == 2
