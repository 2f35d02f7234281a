"""Hostile input: whatever the bytes, the decoder returns a valid message or raises ProtocolError.

No other exception, no hang, no allocation beyond the configured limits.
"""
from __future__ import annotations

import struct
import tracemalloc

import msgpack
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specmesh.runtime import codec
from specmesh.runtime.codec import CodecConfig, ProtocolError, WireLimits, decode, encode
from specmesh.runtime.messages import (
    DraftProposal,
    ErrorMessage,
    OpenSession,
    SamplingParams,
    StageFrame,
    VerifyResult,
)
from specmesh.runtime.sparse import SparseDist, top_k
from specmesh.runtime.sparse import quantise_fp16 as quantise_sparse

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VOCAB = 1000
HEADER = bytes([codec.PROTOCOL_VERSION, 0])
FP16_NAN, FP16_INF, FP16_MINUS_HALF = 0x7E00, 0x7C00, 0xB800
SMALL_LIMITS = WireLimits(max_frame_bytes=1 << 16, max_decompressed_bytes=1 << 20)


def _q() -> SparseDist:
    gen = torch.Generator().manual_seed(0)
    return quantise_sparse(top_k(torch.softmax(3 * torch.randn(3, VOCAB, generator=gen), -1), 4))


def _proposal(dense: bool = False) -> DraftProposal:
    q = _q()
    if dense:
        gen = torch.Generator().manual_seed(1)
        from specmesh.runtime.sparse import dense as dense_q
        q = dense_q(torch.softmax(torch.randn(3, 40, generator=gen), -1))
    return DraftProposal("sess", 5, 17, [1, 2, 3], q.indices[:, 0].clone(), q, [-1, 0, 1], [0])


def _valid_messages() -> list:
    proposal = _proposal()
    return [
        proposal,
        _proposal(dense=True),
        StageFrame(proposal, torch.randn(6, 8).to(torch.bfloat16), [1.0]),
        VerifyResult("sess", 5, 2, [7, 8, 9], [True, True, False]),
        ErrorMessage("sess", 5, "bad-frame", "could not decode"),
        OpenSession("sess", SamplingParams(temperature=0.7),
                    {"acceptance": "exact", "sparse_k": 16, "sparse_mass": 0.95, "greedy": False}),
    ]


VALID_FRAMES = [encode(m, CodecConfig(compress_threshold=None)) for m in _valid_messages()]
ZSTD_FRAMES = [encode(m, CodecConfig(compress_threshold=0)) for m in _valid_messages()]


def decode_or_reject(data: bytes, **kwargs) -> None:
    """Decoding must end in a message or a ProtocolError; anything else fails the test."""
    try:
        msg = decode(data, **kwargs)
    except ProtocolError as exc:
        assert str(exc), "a ProtocolError must say what was wrong"
        return
    assert type(msg) in codec.MESSAGE_TYPES


def body(frame: bytes) -> list:
    return msgpack.unpackb(frame[2:])


def frame_of(fields: list) -> bytes:
    return HEADER + msgpack.packb(fields, use_bin_type=True)


# ---------------------------------------------------------------------------- random input


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    decode_or_reject(data)
    decode_or_reject(HEADER + data)  # past the header, into msgpack
    decode_or_reject(bytes([codec.PROTOCOL_VERSION, codec.FLAG_ZSTD]) + data)  # into zstd


@FUZZ
@given(st.sampled_from(range(len(VALID_FRAMES))), st.data())
def test_bit_flips(which, data):
    for frames in (VALID_FRAMES, ZSTD_FRAMES):
        frame = bytearray(frames[which])
        for _ in range(data.draw(st.integers(1, 3))):
            bit = data.draw(st.integers(0, 8 * len(frame) - 1))
            frame[bit // 8] ^= 1 << (bit % 8)
        decode_or_reject(bytes(frame), vocab_size=VOCAB)


def test_every_truncation_is_rejected():
    for frame in VALID_FRAMES + ZSTD_FRAMES:
        for cut in range(len(frame)):
            with pytest.raises(ProtocolError):
                decode(frame[:cut])


def _json_like() -> st.SearchStrategy:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1),
                       st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=16))
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4), max_leaves=8)


@FUZZ
@given(st.sampled_from(range(len(VALID_FRAMES))), st.data(), _json_like())
def test_any_field_replaced_by_junk(which, data, junk):
    fields = body(VALID_FRAMES[which])
    path, target = [], fields
    while True:  # walk down a random path of nested arrays, then replace the element there
        i = data.draw(st.integers(0, len(target) - 1))
        if isinstance(target[i], list) and target[i] and data.draw(st.booleans()):
            target = target[i]
            path.append(i)
            continue
        target[i] = junk
        break
    decode_or_reject(frame_of(fields), vocab_size=VOCAB)


# ------------------------------------------------------------------------ crafted attacks


@pytest.mark.parametrize("payload", [
    b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion items
    b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
    b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
    b"\xdf\x00\x00\x00\x01\xa1k\x01",  # a map, which the protocol never uses
    b"\xd4\x05\x00",  # fixext: extension types are refused
    b"\xc7\x08\xff" + struct.pack(">q", 0),  # timestamp extension
    b"\x91" * 5000 + b"\x01",  # deep nesting
    b"\x93\x07\xa1s",  # array shorter than it claims
    b"\x94\x07\xa1s\x01\x02\x03",  # trailing bytes after the body
])
def test_oversized_or_forbidden_msgpack_is_rejected(payload):
    with pytest.raises(ProtocolError):
        decode(HEADER + payload)


def test_oversized_length_fields_inside_messages():
    fields = body(VALID_FRAMES[2])  # stage frame
    fields[2][1] = [1 << 40, 1 << 40]  # hidden shape far beyond its buffer
    with pytest.raises(ProtocolError, match="hidden"):
        decode(frame_of(fields))
    fields = body(VALID_FRAMES[0])
    fields[8][2] = [1 << 30, 1, 1]  # a row length beyond the width
    with pytest.raises(ProtocolError, match="row_lengths"):
        decode(frame_of(fields))
    fields = body(VALID_FRAMES[0])
    fields[8][1] = VOCAB  # declared width: 3 x 1000 cells, above a limit of 2048
    with pytest.raises(ProtocolError, match="max_sparse_cells"):
        decode(frame_of(fields), limits=WireLimits(max_sparse_cells=2048))
    with pytest.raises(ProtocolError, match="max_frame_bytes"):
        decode(b"\x01\x00" + b"\x00" * (SMALL_LIMITS.max_frame_bytes + 1), limits=SMALL_LIMITS)


def test_zstd_bomb_is_refused_before_it_is_inflated():
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\x00" * (8 << 20))  # 8 MiB in a few hundred B
    frame = bytes([codec.PROTOCOL_VERSION, codec.FLAG_ZSTD]) + bomb
    assert len(frame) < 2048
    tracemalloc.start()
    with pytest.raises(ProtocolError, match="declares"):
        decode(frame, limits=SMALL_LIMITS)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < SMALL_LIMITS.max_decompressed_bytes


def test_zstd_without_content_size_or_lying_about_it_is_refused():
    streaming = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    unsized = streaming.compress(VALID_FRAMES[3][2:]) + streaming.flush()  # a verdict body
    with pytest.raises(ProtocolError, match="content size"):
        decode(bytes([codec.PROTOCOL_VERSION, codec.FLAG_ZSTD]) + unsized)
    real = VALID_FRAMES[0][2:]  # a proposal body
    content = real + b"\x00" * 600  # trailing zeros: long enough for a 2-byte size field
    sized = bytearray(zstandard.ZstdCompressor().compress(content))
    descriptor = sized[4]  # after the 4-byte magic number
    assert descriptor & 0x20 and descriptor >> 6 == 1, "expected a single-segment frame, 2-byte size"
    struct.pack_into("<H", sized, 5, len(content) - 100 - 256)  # declares 100 bytes fewer (field = size - 256)
    with pytest.raises(ProtocolError):
        decode(bytes([codec.PROTOCOL_VERSION, codec.FLAG_ZSTD]) + bytes(sized))


def test_wrong_version_unknown_flags_and_unknown_tag():
    frame = VALID_FRAMES[4]
    with pytest.raises(ProtocolError, match="version"):
        decode(bytes([codec.PROTOCOL_VERSION + 1]) + frame[1:])
    with pytest.raises(ProtocolError, match="flag"):
        decode(frame[:1] + bytes([0x80]) + frame[2:])
    for tag in (0, 7, 99, -1, "2", None):  # 7: retired, never reused
        with pytest.raises(ProtocolError, match="tag"):
            decode(frame_of([tag, "s", 1, 1]))


def _with_probs(frame: bytes, value: int) -> bytes:
    fields = body(frame)
    q = fields[8]
    probs = bytearray(q[6])
    struct.pack_into("<H", probs, 0, value)
    q[6] = bytes(probs)
    return frame_of(fields)


@pytest.mark.parametrize("value, what", [(FP16_NAN, "finite"), (FP16_INF, "finite"),
                                         (FP16_MINUS_HALF, ">= 0"), (0x3C00, "sums to")])
def test_bad_probabilities_are_rejected(value, what):
    with pytest.raises(ProtocolError, match=what):
        decode(_with_probs(VALID_FRAMES[0], value))


def test_dense_nan_probability_is_rejected():
    fields = body(VALID_FRAMES[1])
    probs = bytearray(fields[9])
    struct.pack_into("<f", probs, 0, float("nan"))
    fields[9] = bytes(probs)
    with pytest.raises(ProtocolError, match="finite"):
        decode(frame_of(fields))


def test_out_of_vocabulary_ids_are_rejected():
    fields = body(VALID_FRAMES[0])
    fields[8][4] = codec.INDEX_UINT32  # rewrite the q indices as plain uint32, one out of range
    n = sum(fields[8][2])
    fields[8][5] = struct.pack(f"<{n}I", VOCAB, *([0] * (n - 1)))
    with pytest.raises(ProtocolError, match="vocabulary"):
        decode(frame_of(fields))
    fields = body(VALID_FRAMES[0])
    fields[8][5] = bytes([0x80 | 0x7F, 0x7F]) + fields[8][5][2:]  # a varint gap of 16383: out of 1000
    with pytest.raises(ProtocolError):
        decode(frame_of(fields))
    fields = body(VALID_FRAMES[0])
    fields[4] = struct.pack("<3I", 1, 2, VOCAB)  # a context token outside the vocabulary
    with pytest.raises(ProtocolError, match="vocabulary"):
        decode(frame_of(fields))
    fields = body(VALID_FRAMES[3])
    fields[4] = struct.pack("<3I", 1, 2, VOCAB)  # a verdict token outside the receiver's vocabulary
    with pytest.raises(ProtocolError, match="vocabulary"):
        decode(frame_of(fields), vocab_size=VOCAB)


def test_candidate_the_draft_could_not_have_drawn_is_rejected():
    fields = body(VALID_FRAMES[0])
    q = _q()
    absent = next(t for t in range(VOCAB) if t not in q.indices[0].tolist())
    fields[5] = struct.pack("<3I", absent, *q.indices[1:, 0].tolist())
    with pytest.raises(ProtocolError, match="q = 0"):
        decode(frame_of(fields))
