"""Batched rounds: one forward per stage over several sessions equals each session's own step."""
from __future__ import annotations

import pytest
import torch

from specmesh.actors import batched, hf, tiny
from specmesh.actors.draft import DraftWorker
from specmesh.actors.stage import TargetStage
from specmesh.runtime.messages import OpenSession, ProposeRequest, SamplingParams, StageFrame, VerifyResult
from specmesh.runtime.tree import tree_attention_mask

torch.set_num_threads(1)
# (prompt, width, temperature): different lengths, chains and trees, greedy and sampled.
SESSIONS = [
    (list(range(3, 14)), 1, 0.0),
    ([7, 1, 250], 2, 0.0),
    (list(range(40, 61)), 1, 1.0),
    ([9, 8, 7, 6, 5, 4], 3, 1.0),
    ([100], 1, 0.0),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("models"))
    target = tiny.materialise("tiny", cache)
    draft = hf.load_stage(tiny.materialise("tiny-draft", cache), dtype=torch.float32)
    stages = [hf.load_stage(target, r, dtype=torch.float32) for r in (range(0, 1), range(1, 3), range(3, 4))]
    return draft, stages


def _open(workers, sid, temperature, seed):
    msg = OpenSession(sid, SamplingParams(temperature=temperature, seed=seed), {"sparse_k": 8})
    for w in workers:
        w.open(msg)


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float rounding: within 1e-5 of the largest magnitude (hidden states reach ~60)."""
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-5 * max(1.0, float(a.abs().max()))


def _assert_same(solo, many):
    assert type(solo) is type(many), (solo, many)
    if isinstance(solo, StageFrame):
        _assert_close(solo.hidden, many.hidden)
        assert solo.proposal is many.proposal
    else:
        assert isinstance(solo, VerifyResult)
        assert (solo.accepted, solo.tokens, solo.accepted_mask, solo.path) == \
               (many.accepted, many.tokens, many.accepted_mask, many.path)


def test_step_many_equals_step_one_by_one(models):
    draft_model, stage_models = models
    draft = DraftWorker(draft_model)
    solo = [TargetStage(m) for m in stage_models]
    many = [TargetStage(m) for m in stage_models]
    state = {}
    for k, (prompt, width, temp) in enumerate(SESSIONS):
        sid = f"s{k}"
        _open([draft, *solo, *many], sid, temp, seed=k)
        state[sid] = dict(committed=list(prompt), told=0, keep=0, path=[], width=width)
    for rnd in range(1, 6):
        gamma = 1 + rnd % 4  # rounds of different depths, and sessions of different lengths
        msgs = {}
        for sid, st in state.items():
            req = ProposeRequest(sid, rnd, st["told"], st["committed"][st["told"]:], gamma, st["keep"],
                                 st["width"], st["path"])
            st["told"] = len(st["committed"])
            msgs[sid] = draft.propose(req)
        solo_msgs, many_msgs = dict(msgs), list(msgs.values())
        for a, b in zip(solo, many):
            solo_msgs = {sid: a.step(m) for sid, m in solo_msgs.items()}
            many_msgs = b.step_many(many_msgs)
            for s_out, m_out in zip(solo_msgs.values(), many_msgs):
                _assert_same(s_out, m_out)
        for (sid, st), verdict in zip(state.items(), solo_msgs.values()):
            base = len(st["committed"])
            st["committed"] += verdict.tokens
            st["keep"], st["path"] = base + verdict.accepted, list(verdict.path)
    for a, b in zip(solo, many):  # the caches afterwards hold the same keys and values
        for sid in state:
            ca, cb = a.sessions[sid].cache, b.sessions[sid].cache
            assert hf.cache_length(ca) == hf.cache_length(cb) > 0
            for la, lb in zip(ca.layers, cb.layers):
                _assert_close(la.keys, lb.keys)
                _assert_close(la.values, lb.values)


def test_a_bad_message_fails_only_itself(models):
    draft_model, stage_models = models
    draft, stage = DraftWorker(draft_model), TargetStage(stage_models[0])
    for sid in ("a", "b", "c"):
        _open([draft, stage], sid, 0.0, 0)
    good = [draft.propose(ProposeRequest(sid, 1, 0, [5, 6, 7], 2, 0)) for sid in ("a", "b")]
    stage.close("c")
    bad = draft.propose(ProposeRequest("c", 1, 0, [5, 6], 2, 0))
    out = stage.step_many([good[0], bad, good[1], good[0]])
    assert isinstance(out[0], StageFrame) and isinstance(out[2], StageFrame)
    assert isinstance(out[1], KeyError) and "no open session 'c'" in str(out[1])
    assert isinstance(out[3], ValueError) and "two rounds of session 'a'" in str(out[3])
    # A stale round alone goes through step() itself and answers its error.
    (stale,) = stage.step_many([good[1]])
    assert isinstance(stale, ValueError) and "stale round 1" in str(stale)


def test_batch_mask_shows_each_row_its_own_columns():
    tree = tree_attention_mask([-1, 0, 0], num_cached=2, num_context=1, dtype=torch.float32)  # [1,1,4,6]
    mask = batched.batch_mask([2, 0], [tree, None], [4, 2], torch.float32)  # [2, 1, 4, 2 + 4]
    seen = mask[:, 0] == 0
    assert mask.shape == (2, 1, 4, 6)
    assert torch.equal(seen[0, :, :2], torch.ones(4, 2, dtype=torch.bool))  # session 0's cache
    assert torch.equal(seen[0, :, 2:], tree[0, 0, :, 2:] == 0)  # its tree over the new columns
    # Session 1: no cache, two causal rows, two padded rows that see only themselves.
    want = torch.tensor([[0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]])
    assert torch.equal(seen[1], want.bool())
    with pytest.raises(ValueError, match=r"mask of session 0 has shape \(1, 1, 4, 6\), want \(1, 1, 4, 5\)"):
        batched.batch_mask([1, 0], [tree, None], [4, 2], torch.float32)
