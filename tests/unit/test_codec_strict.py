"""One test per decode-side rule: a frame that breaks only that rule is refused, naming the field.

Each case starts from a valid body, changes one thing, and checks that decode raises ProtocolError
whose text names the field (or limit) that the rule guards. The unchanged body decodes (first test),
so a case fails exactly when its rule is missing.
"""
from __future__ import annotations

import struct

import msgpack
from frame_edit import body_of, edited, frame, set_at as _set
import pytest
import torch
import zstandard

from specmesh.runtime import codec
from specmesh.runtime.codec import CodecConfig, ProtocolError, WireLimits, decode, encode
from specmesh.runtime.messages import DraftProposal, ErrorMessage, OpenSession, SamplingParams, StageFrame, \
    VerifyResult
from specmesh.runtime.sparse import dense, quantise_fp16, top_k

VOCAB = 1000
RAW = CodecConfig(compress_threshold=None)
F16, F32, I32 = codec.DTYPE_CODES[torch.float16], codec.DTYPE_CODES[torch.float32], codec.DTYPE_CODES[torch.int32]
NAN16, ONE16, MINUS16 = 0x7E00, 0x3C00, 0xB800


def _q(rows: int = 3):
    gen = torch.Generator().manual_seed(0)
    return quantise_fp16(top_k(torch.softmax(3 * torch.randn(rows, VOCAB, generator=gen), -1), 4))


def _proposal(q=None) -> DraftProposal:
    q = _q() if q is None else q
    return DraftProposal("sess", 5, 17, [1, 2, 3], q.indices[:, 0].clone(), q, [-1, 0, 1], [0])


def _dense() -> DraftProposal:
    gen = torch.Generator().manual_seed(1)
    q = dense(torch.softmax(torch.randn(3, 40, generator=gen), -1))
    return DraftProposal("sess", 5, 17, [1, 2], torch.tensor([1, 2, 3]), q)


BASES = {
    "proposal": encode(_proposal(), RAW),
    "uint32": encode(_proposal(), CodecConfig(compress_threshold=None, index_coding="uint32")),
    "fp32": encode(_proposal(), CodecConfig(compress_threshold=None, prob_dtype=torch.float32)),
    "dense": encode(_dense(), RAW),
    "stage": encode(StageFrame(_proposal(), torch.randn(6, 4).to(torch.bfloat16), [1.0]), RAW),
    "verify": encode(VerifyResult("sess", 5, 2, [7, 8, 9], [True, True, False], [0, 1], [1.0]), RAW),
    "error": encode(ErrorMessage("sess", -1, "bad-frame", "text"), RAW),
    "open": encode(OpenSession("sess", SamplingParams(0.7, 5, 0.9, 3), {"acceptance": "exact", "k": 4}), RAW),
}


def fields(base: str) -> list:
    return body_of(BASES[base])


def q_of(body: list) -> list:
    return body[8] if body[0] == codec.Tag.PROPOSAL else body[1][8]


def set_probs(body: list, values: list[int], fmt: str = "<H") -> list:
    q = q_of(body)
    buf = bytearray(q[6])
    for i, v in enumerate(values):
        struct.pack_into(fmt, buf, i * struct.calcsize(fmt), v)
    q[6] = bytes(buf)
    return body


def edit(base: str, change) -> bytes:
    return edited(BASES[base], change)


SMALL = WireLimits(max_frame_bytes=4096, max_decompressed_bytes=2048, max_tokens=2, max_list_len=8,
                   max_str_bytes=8, max_sparse_cells=8, max_dense_cells=100, max_tensor_dims=1)
ids = lambda *v: struct.pack(f"<{len(v)}I", *v)  # noqa: E731
_varints = fields("proposal")[8][5]



def _overlong_first(varints: bytes) -> bytes:
    """The same ids with the first one written in 5 bytes (value unchanged: the extra groups are 0)."""
    n = next(i for i, b in enumerate(varints) if not b & 0x80) + 1
    assert n == 1, "the first gap of the base q is expected to fit one byte"
    return bytes([varints[0] | 0x80, 0x80, 0x80, 0x80, 0x00]) + varints[1:]


# (rule, frame, what the error must name, decode kwargs)
CASES = [
    # frame
    ("version", bytes([codec.PROTOCOL_VERSION + 1]) + BASES["verify"][1:], "version", {}),
    ("flags", BASES["verify"][:1] + b"\x02" + BASES["verify"][2:], "flag", {}),
    ("frame size", BASES["stage"], "max_frame_bytes", {"limits": WireLimits(max_frame_bytes=64)}),
    ("header length", BASES["verify"][:1], "header", {}),
    ("zstd content size", bytes([codec.PROTOCOL_VERSION, 1]) + zstandard.ZstdCompressor(write_content_size=False).compressobj()
     .compress(BASES["verify"][2:]) + b"", "content size", {}),
    ("decompressed size", bytes([codec.PROTOCOL_VERSION, 1]) + zstandard.ZstdCompressor().compress(BASES["stage"][2:]),
     "max_decompressed_bytes", {"limits": WireLimits(max_decompressed_bytes=64)}),
    ("raw body size", BASES["stage"], "max_decompressed_bytes", {"limits": WireLimits(max_decompressed_bytes=64)}),
    ("unknown tag", frame([6, "s", 1, 1, []]), "tag", {}),
    ("body not an array", bytes([codec.PROTOCOL_VERSION, 0]) + msgpack.packb({"a": 1}), "array", {}),
    ("malformed msgpack", BASES["verify"][:-1], "VERIFY_RESULT", {}),
    # field count and types (the schema)
    ("extra field", edit("verify", lambda b: b.append(1)), "VERIFY_RESULT", {}),
    ("missing field", edit("verify", lambda b: b.pop()), "VERIFY_RESULT", {}),
    ("int type", edit("verify", _set((2,), "5")), "VERIFY_RESULT.round", {}),
    ("bool is not int", edit("verify", _set((3,), True)), "VERIFY_RESULT.accepted", {}),
    ("round >= 0", edit("proposal", _set((2,), -1)), "PROPOSAL.round", {}),
    ("rollback >= 0", edit("proposal", _set((3,), -1)), "PROPOSAL.rollback", {}),
    ("error round int64", edit("error", _set((2,), 1 << 63)), "ERROR.round", {}),
    ("parents >= -1", edit("proposal", _set((6, 0), -2)), "PROPOSAL.parents[0]", {}),
    ("prev_path >= 0", edit("proposal", _set((7, 0), -1)), "PROPOSAL.prev_path[0]", {}),
    ("list length", edit("verify", _set((6,), list(range(9)))), "VERIFY_RESULT.path", {"limits": SMALL}),
    ("accepted <= max_list_len", edit("verify", _set((3,), 9)), "VERIFY_RESULT.accepted", {"limits": SMALL}),
    ("mask holds bools", edit("verify", _set((5, 0), 1)), "VERIFY_RESULT.accepted_mask[0]", {}),
    ("stage_ms >= 0", edit("verify", _set((7, 0), -1.0)), "VERIFY_RESULT.stage_ms[0]", {}),
    ("stage_ms not NaN", edit("stage", _set((3, 0), float("nan"))), "STAGE_FRAME.stage_ms[0]", {}),
    ("stage_ms finite", edit("stage", _set((3, 0), float("inf"))), "STAGE_FRAME.stage_ms[0]", {}),
    ("str bytes", edit("error", _set((3,), "é" * 5)), "ERROR.code", {"limits": SMALL}),
    ("session str type", edit("proposal", _set((1,), b"sess")), "PROPOSAL.session_id", {}),
    ("context ids", edit("proposal", _set((4,), ids(1, 2, 3))), "PROPOSAL.context", {"limits": SMALL}),
    ("ids uint32 buffer", edit("proposal", _set((4,), b"\x01\x00\x00")), "PROPOSAL.context", {}),
    ("temperature >= 0", edit("open", _set((2, 0), -0.5)), "OPEN_SESSION.params.temperature", {}),
    ("temperature finite", edit("open", _set((2, 0), float("inf"))), "OPEN_SESSION.params.temperature", {}),
    ("top_k >= 0", edit("open", _set((2, 1), -1)), "OPEN_SESSION.params.top_k", {}),
    ("top_p > 0", edit("open", _set((2, 2), 0.0)), "OPEN_SESSION.params.top_p", {}),
    ("top_p <= 1", edit("open", _set((2, 2), 1.5)), "OPEN_SESSION.params.top_p", {}),
    ("params count", edit("open", lambda b: b[2].append(1)), "OPEN_SESSION.params", {}),
    ("policy key pattern", edit("open", _set((3, "Bad"), 1)), "OPEN_SESSION.policy key", {}),
    ("policy key newline", edit("open", _set((3, "ok\n"), 1)), "OPEN_SESSION.policy key", {}),
    ("policy entries", edit("open", lambda b: b[3].update({f"k{i}": i for i in range(64)})),
     "OPEN_SESSION.policy", {}),
    ("policy str length", edit("open", _set((3, "k"), "x" * 257)), "OPEN_SESSION.policy", {}),
    ("policy float finite", edit("open", _set((3, "k"), float("nan"))), "OPEN_SESSION.policy", {}),
    ("policy value type", edit("open", _set((3, "k"), [1])), "OPEN_SESSION.policy", {}),
    ("tensor dims", BASES["stage"], "STAGE_FRAME.hidden.shape", {"limits": WireLimits(max_tensor_dims=1)}),
    # proposals
    ("parents count", edit("proposal", _set((6,), [-1, 0])), "PROPOSAL.parents", {}),
    ("parents come first", edit("proposal", _set((6, 1), 1)), "PROPOSAL.parents[1]", {}),
    ("receiver vocabulary", BASES["proposal"], "PROPOSAL.q.vocab_size", {"vocab_size": 999}),
    ("dense receiver vocabulary", BASES["dense"], "PROPOSAL_DENSE.vocab_size", {"vocab_size": 41}),
    ("context id in q's vocabulary", edit("proposal", _set((4,), ids(1, 2, VOCAB))), "PROPOSAL.context", {}),
    ("candidate id in q's vocabulary", edit("dense", _set((5,), ids(1, 2, 40))), "PROPOSAL_DENSE.candidates", {}),
    ("receiver bounds ids", edit("stage", _set((1, 4), ids(1, 2, 999))), "STAGE_FRAME.proposal.context",
     {"vocab_size": 999}),
    ("drawable", edit("proposal", _set((5,), ids(*[t for t in range(VOCAB) if t not in
                                                   _q().indices[0].tolist()][:1], *_q().indices[1:, 0].tolist()))),
     "PROPOSAL.q", {}),
    # sparse q
    ("q vocab <= max", edit("proposal", _set((8, 0), 1 << 25)), "PROPOSAL.q.vocab_size", {}),
    ("q width <= vocab", edit("proposal", _set((8, 1), VOCAB + 1)), "PROPOSAL.q.width", {}),
    ("q rows", edit("proposal", _set((8, 2), [4, 4])), "PROPOSAL.q.row_lengths", {}),
    ("q row length >= 1", edit("proposal", _set((8, 2), [4, 4, 0])), "PROPOSAL.q.row_lengths", {}),
    ("q row length <= width", edit("proposal", _set((8, 1), 3)), "PROPOSAL.q.row_lengths", {}),
    ("q cells", BASES["proposal"], "max_sparse_cells", {"limits": WireLimits(max_sparse_cells=11)}),
    ("q prob dtype", edit("proposal", _set((8, 3), I32)), "PROPOSAL.q.prob_dtype", {}),
    ("q index coding", edit("proposal", _set((8, 4), 2)), "PROPOSAL.q.index_coding", {}),
    ("q uint32 count", edit("uint32", lambda b: b[8].__setitem__(5, b[8][5][:-4])), "PROPOSAL.q.indices", {}),
    ("q uint32 range", edit("uint32", lambda b: b[8].__setitem__(5, ids(VOCAB) + b[8][5][4:])),
     "PROPOSAL.q.indices", {}),
    ("varint bytes bound", edit("proposal", _set((8, 5), b"\x80" * 48 + b"\x00")), "PROPOSAL.q.indices", {}),
    ("varint count", edit("proposal", _set((8, 5), _varints + b"\x01")), "PROPOSAL.q.indices", {}),
    ("varint at most 4 bytes", edit("proposal", _set((8, 5), _overlong_first(_varints))),
     "PROPOSAL.q.indices", {}),
    ("varint ends a value", edit("proposal", _set((8, 5), _varints + b"\x80")),
     "PROPOSAL.q.indices", {}),
    ("varint range", edit("proposal", _set((8, 5), b"\xff\x7f" + _varints[2:])), "PROPOSAL.q.indices", {}),
    ("q probs length", edit("proposal", lambda b: b[8].__setitem__(6, b[8][6][:-2])), "PROPOSAL.q.probs", {}),
    ("fp16 finite", edit("proposal", lambda b: set_probs(b, [NAN16])), "PROPOSAL.q.probs", {}),
    ("fp16 >= 0", edit("proposal", lambda b: set_probs(b, [MINUS16])), "PROPOSAL.q.probs", {}),
    ("fp16 row sums", edit("proposal", lambda b: set_probs(b, [ONE16])), "PROPOSAL.q.probs", {}),
    ("fp32 row sums", edit("fp32", lambda b: set_probs(b, [0x3F800000], "<I")), "PROPOSAL.q.probs", {}),
    ("deferred q checked", edit("stage", _set((1, 8, 2), [4, 4])), "STAGE_FRAME.proposal.q.row_lengths", {}),
    # dense q
    ("dense cells", BASES["dense"], "PROPOSAL_DENSE.q", {"limits": WireLimits(max_dense_cells=119)}),
    ("dense length", edit("dense", lambda b: b.__setitem__(9, b[9][:-4])), "PROPOSAL_DENSE.q", {}),
    ("dense finite", edit("dense", lambda b: b.__setitem__(9, struct.pack("<f", float("nan")) + b[9][4:])),
     "PROPOSAL_DENSE.q", {}),
    ("dense >= 0", edit("dense", lambda b: b.__setitem__(9, struct.pack("<f", -0.5) + b[9][4:])),
     "PROPOSAL_DENSE.q", {}),
    ("dense row sums", edit("dense", lambda b: b.__setitem__(9, struct.pack("<f", 0.5) + b[9][4:])),
     "PROPOSAL_DENSE.q", {}),
    # stage frames
    ("hidden rows", edit("stage", _set((2, 1), [3, 8])), "STAGE_FRAME.hidden", {}),
    ("hidden 2-D", edit("stage", _set((2, 1), [6, 2, 2])), "STAGE_FRAME.hidden", {}),
    ("hidden dtype allowed", edit("stage", _set((2, 0), I32)), "STAGE_FRAME.hidden.dtype", {}),
    ("tensor dtype code", edit("stage", _set((2, 0), 99)), "STAGE_FRAME.hidden.dtype", {}),
    ("tensor buffer length", edit("stage", _set((2, 1), [6, 3])), "STAGE_FRAME.hidden.shape", {}),
    ("hidden NaN", edit("stage", lambda b: b[2].__setitem__(2, b"\xc0\x7f" + b[2][2][2:])), "STAGE_FRAME.hidden", {}),
    # verdicts
    ("tokens = accepted + 1", edit("verify", _set((3,), 1)), "VERIFY_RESULT.tokens", {}),
    ("verdict vocabulary", BASES["verify"], "VERIFY_RESULT.tokens", {"vocab_size": 9}),
]


@pytest.mark.parametrize("base", list(BASES))
def test_the_unbroken_bases_decode(base):
    decode(BASES[base]).__class__  # noqa: B018
    if base == "stage":
        decode(BASES[base]).proposal.q  # noqa: B018


@pytest.mark.parametrize("rule, data, names, kwargs", CASES, ids=[c[0] for c in CASES])
def test_a_frame_breaking_one_rule_is_refused_naming_it(rule, data, names, kwargs):
    with pytest.raises(ProtocolError) as info:
        msg = decode(data, **kwargs)
        if isinstance(msg, StageFrame):
            msg.proposal.q  # noqa: B018 - the last stage's read
    assert names in str(info.value), f"{rule}: {info.value}"
