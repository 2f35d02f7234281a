"""Speculation on several verdicts: whichever guessed verdict commits, the next proposal reuses its
depths and equals what a draft that never speculated proposes (tokens and q rows, bit for bit)."""
from __future__ import annotations

import pytest
import torch

from specmesh.actors import hf, tiny
from specmesh.actors.cheap_draft import make_cheaper
from specmesh.actors.draft import DraftWorker
from specmesh.actors.speculation import alternative_verdicts
from specmesh.runtime.messages import OpenSession, ProposeRequest, SamplingParams

torch.set_num_threads(1)
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7]
GAMMA = 4
POLICY = {"sparsifier": "top-k", "sparse_k": 8}


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    return tiny.materialise("tiny-draft:noise=0.3", tmp_path_factory.mktemp("models"))


def _worker(path, quant: str) -> DraftWorker:
    return DraftWorker(make_cheaper(hf.load_stage(path, dtype=torch.float32), quant))


def _first_round(w: DraftWorker, temperature: float):
    w.open(OpenSession("s", SamplingParams(temperature=temperature, seed=11), POLICY))
    return w.propose(ProposeRequest("s", 1, 0, list(PROMPT), GAMMA, 0))


def _verdicts(w: DraftWorker, first) -> list[list[int]]:
    """The committed tokens of each verdict speculation guessed, best first."""
    return [b.context for b in w.sessions["s"].spec_branches]


@pytest.mark.parametrize("quant", ["dense", "int8", "int4"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_guessed_verdict_is_reused_and_proposes_what_a_fresh_draft_does(draft_dir, quant, temperature):
    probe = _worker(draft_dir, quant)
    first = _first_round(probe, temperature)
    probe.speculate("s", GAMMA, 1, None)
    contexts = _verdicts(probe, first)
    drafted = first.candidates.tolist()
    assert len(contexts) == 3, contexts  # all accepted + bonus; last rejected; all accepted + runner-up
    assert contexts[0][:-1] == PROMPT + drafted and contexts[2][:-1] == PROMPT + drafted
    assert contexts[1][:-1] == PROMPT + drafted[:-1] and contexts[1][-1] != drafted[-1]
    assert contexts[0][-1] != contexts[2][-1]
    for k, committed in enumerate(contexts):
        spec = _worker(draft_dir, quant)
        _first_round(spec, temperature)
        spec.speculate("s", GAMMA, 1, None)
        plain = _worker(draft_dir, quant)
        _first_round(plain, temperature)
        new = committed[len(PROMPT):]
        req = ProposeRequest("s", 2, len(PROMPT), new, GAMMA, len(PROMPT))
        got, want = spec.propose(req), plain.propose(req)
        assert got.candidates.tolist() == want.candidates.tolist(), f"verdict {k}"
        assert torch.equal(got.q.indices, want.q.indices) and torch.equal(got.q.probs, want.q.probs), f"verdict {k}"
        # the branch's own cache state came back (no re-feeding): the caches hold the same tokens
        assert spec.sessions["s"].cached == plain.sessions["s"].cached, f"verdict {k}"
        c = spec.sessions["s"].counters
        assert c["proposals_hit"] == 1 and c["reused"] == GAMMA and c["hits_alt"] == int(k > 0), (k, c)
        # and the round after still matches: the restored cache is the branch's own
        req3 = ProposeRequest("s", 3, len(committed), [int(got.candidates[0])], GAMMA, len(committed))
        assert spec.propose(req3).candidates.tolist() == plain.propose(req3).candidates.tolist(), f"verdict {k}"


def test_a_verdict_nobody_guessed_drafts_afresh(draft_dir):
    w = _worker(draft_dir, "dense")
    first = _first_round(w, 0.0)
    w.speculate("s", GAMMA, 1, None)
    guessed = {tuple(c) for c in _verdicts(w, first)}
    other = next(t for t in range(50) if tuple(PROMPT + [t]) not in guessed)
    w.propose(ProposeRequest("s", 2, len(PROMPT), [other], GAMMA, len(PROMPT)))
    c = w.sessions["s"].counters
    assert c["proposals_hit"] == 0 and c["reused"] == 0 and c["branches"] == 3


def test_trees_speculate_on_full_acceptance_only(draft_dir):
    w = _worker(draft_dir, "dense")
    w.open(OpenSession("s", SamplingParams(temperature=0.0, seed=1), POLICY))
    w.propose(ProposeRequest("s", 1, 0, list(PROMPT), GAMMA, 0, width=2))
    w.speculate("s", GAMMA, 2, None)
    assert len(w.sessions["s"].spec_branches) == 1


def test_a_spent_budget_stops_after_the_likeliest_verdict(draft_dir):
    w = _worker(draft_dir, "dense")
    _first_round(w, 0.0)
    w.speculate("s", GAMMA, 1, 0.0)
    assert len(w.sessions["s"].spec_branches) == 1


def test_alternative_verdicts_order_and_gaps():
    assert alternative_verdicts([1], [2, 3], 9, 8) == [[1, 2, 9], [1, 2, 3, 8]]
    assert alternative_verdicts([1], [2, 3], None, 8) == [[1, 2, 3, 8]]
    assert alternative_verdicts([1], [], None, None) == []


def test_a_proposal_that_arrives_stops_speculation_after_the_depth_in_hand(draft_dir):
    w = _worker(draft_dir, "dense")
    _first_round(w, 0.0)
    calls = {"n": 0}
    depth = w._depth

    def counting(s, context, width):
        calls["n"] += 1
        if calls["n"] == 2:
            w.interrupt("s")  # the next proposal arrives while the second depth is computed
        return depth(s, context, width)

    w._depth = counting
    w.speculate("s", GAMMA, 1, None)  # no time budget: only the interrupt stops it
    branches = w.sessions["s"].spec_branches
    assert calls["n"] == 2 and len(branches) == 1 and len(branches[0].depths) == 1
    w._depth = depth
    w.propose(ProposeRequest("s", 2, len(PROMPT), branches[0].context[len(PROMPT):], GAMMA, len(PROMPT)))
    assert "s" not in w._interrupted  # the proposal clears it: the next speculation runs
    w.interrupt("s")
    w.speculate("s", GAMMA, 1, None)  # interrupted before it starts: drafts nothing
    assert w.sessions["s"].spec_branches == []
