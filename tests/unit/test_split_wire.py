"""One test per rule of split verification's wire (PROPOSAL_SPLIT, VERIFY_SPLIT), decode and encode.

As in test_codec_strict: each case starts from a valid body, changes one thing, and checks that
decode raises a ProtocolError naming the field the rule guards; the unchanged bodies decode (first
test), so a case fails exactly when its rule is missing.
"""
from __future__ import annotations

import dataclasses
import struct

from frame_edit import body_of, edited, set_at as _set
import pytest
import torch

from specmesh.policies.split import target_support
from specmesh.runtime import codec
from specmesh.runtime.codec import CodecConfig, ProtocolError, decode, encode
from specmesh.runtime.messages import DraftProposal, StageFrame, VerifyResult
from specmesh.runtime.sparse import SparseDist

VOCAB = 1000
RAW = CodecConfig(compress_threshold=None)
F16 = codec.DTYPE_CODES[torch.float16]
Q_X = [0.5, 1.0, 0.25]


def _proposal(**kw) -> DraftProposal:
    base = dict(session_id="sess", round=5, rollback=17, context=[1, 2], candidates=torch.tensor([4, 5, 6]),
                q=SparseDist.empty(VOCAB), q_x=torch.tensor(Q_X))
    return DraftProposal(**{**base, **kw})


def _p_row() -> torch.Tensor:
    return torch.softmax(torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)), -1)  # [V]


def _verdict(**kw) -> VerifyResult:
    base = dict(session_id="sess", round=5, accepted=1, tokens=[4], accepted_mask=[True, False, False],
                stage_ms=[1.0], correction_p=target_support(_p_row()))
    return VerifyResult(**{**base, **kw})


BASES = {
    "split": encode(_proposal(), RAW),
    "stage": encode(StageFrame(_proposal(), torch.randn(5, 4), [1.0]), RAW),
    "pending": encode(_verdict(), RAW),
}
# Body positions: PROPOSAL_SPLIT [tag, session, round, rollback, context, candidates, parents,
# prev_path, vocab_size, q_x, draft_ms]; VERIFY_SPLIT [tag, session, round, accepted, tokens, mask,
# path, stage_ms, draft_ms, correction_p = [vocab, width, row_lengths, dtype, coding, ids, probs]].
QX, CP = 9, 9


def fields(base: str) -> list:
    return body_of(BASES[base])


def edit(base: str, change) -> bytes:
    return edited(BASES[base], change)


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


ids = lambda *v: struct.pack(f"<{len(v)}I", *v)  # noqa: E731

CASES = [
    # uplink: q_x
    ("q_x finite (NaN)", edit("split", _set((QX,), f32(float("nan"), 1.0, 0.25))), "PROPOSAL_SPLIT.q_x", {}),
    ("q_x finite (inf)", edit("split", _set((QX,), f32(float("inf"), 1.0, 0.25))), "PROPOSAL_SPLIT.q_x", {}),
    ("q_x > 0", edit("split", _set((QX,), f32(0.0, 1.0, 0.25))), "PROPOSAL_SPLIT.q_x[0]", {}),
    ("q_x not negative", edit("split", _set((QX,), f32(0.5, -0.5, 0.25))), "PROPOSAL_SPLIT.q_x[1]", {}),
    ("q_x <= 1", edit("split", _set((QX,), f32(0.5, 1.0, 1.5))), "PROPOSAL_SPLIT.q_x[2]", {}),
    ("q_x one per candidate", edit("split", _set((QX,), f32(0.5, 1.0))), "PROPOSAL_SPLIT.q_x", {}),
    ("q_x float32 buffer", edit("split", _set((QX,), f32(*Q_X)[:-1])), "PROPOSAL_SPLIT.q_x", {}),
    ("q_x bounded by max_list_len", edit("split", _set((QX,), f32(*[0.5] * 4097))), "PROPOSAL_SPLIT.q_x", {}),
    ("split is a chain", edit("split", _set((6,), [-1, 0, 1])), "PROPOSAL_SPLIT.parents", {}),
    ("receiver vocabulary", BASES["split"], "PROPOSAL_SPLIT.vocab_size", {"vocab_size": 999}),
    ("candidate in the vocabulary", edit("split", _set((5,), ids(4, 5, VOCAB))), "PROPOSAL_SPLIT.candidates", {}),
    ("context in the vocabulary", edit("split", _set((4,), ids(1, VOCAB))), "PROPOSAL_SPLIT.context", {}),
    ("nested in a stage frame", edit("stage", _set((1, QX), f32(0.0, 1.0, 0.25))),
     "STAGE_FRAME.proposal.q_x[0]", {}),
    # downlink: correction_p
    ("p in float32 only", edit("pending", _set((CP, 3), F16)), "VERIFY_SPLIT.correction_p.prob_dtype", {}),
    ("p one row", edit("pending", _set((CP, 2), [500, 500])), "VERIFY_SPLIT.correction_p.row_lengths", {}),
    ("p row sums to 1", edit("pending", lambda b: b[CP].__setitem__(6, f32(2.0) + b[CP][6][4:])),
     "VERIFY_SPLIT.correction_p.probs", {}),
    ("p finite", edit("pending", lambda b: b[CP].__setitem__(6, f32(float("nan")) + b[CP][6][4:])),
     "VERIFY_SPLIT.correction_p.probs", {}),
    ("p receiver vocabulary", BASES["pending"], "VERIFY_SPLIT.correction_p.vocab_size", {"vocab_size": 999}),
    ("pending: tokens = accepted", edit("pending", _set((4,), ids(4, 7))), "VERIFY_SPLIT.tokens", {}),
    ("pending only after a rejection", edit("pending", lambda b: (b.__setitem__(3, 3), b.__setitem__(4, ids(4, 5, 6)))),
     "VERIFY_SPLIT.accepted", {}),
    ("pending: chains only", edit("pending", _set((6,), [0])), "VERIFY_SPLIT.path", {}),
    ("pending tokens in p's vocabulary", edit("pending", _set((4,), ids(VOCAB))), "VERIFY_SPLIT.tokens", {}),
]


@pytest.mark.parametrize("base", list(BASES))
def test_the_unbroken_bases_decode(base):
    msg = decode(BASES[base], vocab_size=VOCAB)
    if base == "pending":
        assert msg.pending and torch.equal(msg.correction_p.to_dense()[0], _p_row())  # float32, bit for bit
    else:
        proposal = msg if base == "split" else msg.proposal
        assert proposal.split and proposal.q_x.tolist() == Q_X and proposal.q.num_positions == 0


@pytest.mark.parametrize("rule,data,names,kw", CASES, ids=[c[0] for c in CASES])
def test_each_rule_refuses_its_break(rule, data, names, kw):
    with pytest.raises(ProtocolError) as err:
        decode(data, **kw)
    assert names in str(err.value), str(err.value)


@pytest.mark.parametrize("msg,names", [
    (_proposal(q_x=torch.tensor(Q_X, dtype=torch.float64)), "q_x"),
    (_proposal(q_x=torch.tensor([0.5, 0.0, 0.25])), "q_x[1]"),
    (_proposal(q_x=torch.tensor([0.5, 1.0])), "q_x"),
    (_proposal(parents=[-1, 0, 1]), "parents"),
    (_proposal(q=SparseDist(torch.tensor([[4]]), torch.ones(1, 1), VOCAB)), "q"),
    (_verdict(tokens=[4, 9]), "tokens"),
    (_verdict(accepted=3, tokens=[4, 5, 6]), "accepted"),
    (_verdict(correction_p=SparseDist.concat([target_support(_p_row())] * 2)), "correction_p"),
], ids=["q_x float64", "q_x zero", "q_x count", "tree", "q rows too", "tokens", "no rejection", "two rows"])
def test_the_sender_refuses_what_the_receiver_would(msg, names):
    with pytest.raises(ProtocolError) as err:
        encode(msg)
    assert names in str(err.value), str(err.value)


def test_a_target_side_verdict_is_unchanged():
    """The split field is absent from target-side frames: tag 5 and its bytes are as before."""
    plain = VerifyResult("sess", 5, 2, [7, 8, 9], [True, True, False], [], [1.0])
    data = encode(plain, RAW)
    assert data[2] == 0x99 and data[3] == codec.Tag.VERIFY_RESULT  # 9 fields, tag 5
    assert decode(data).correction_p is None
    assert dataclasses.replace(decode(BASES["pending"]), correction_p=None).tokens == [4]


def test_split_uplink_is_four_bytes_a_candidate():
    """q_x costs 4 bytes per candidate (float32), whatever the vocabulary."""
    sizes = [len(encode(_proposal(candidates=torch.arange(g) + 4, q_x=torch.full((g,), 0.5)), RAW))
             for g in (1, 9)]
    assert sizes[1] - sizes[0] == 8 * (4 + 4)  # 4 bytes of id + 4 of q_x per candidate
