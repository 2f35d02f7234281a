"""Issue 17's decoding bombs: small frames that once cost gigabytes and seconds are refused cheaply,
each as a ProtocolError naming what was wrong. And a middle stage passes q on without decoding it.

Memory is measured two ways around each decode: tracemalloc's peak (Python, numpy, msgspec objects)
and the rise of the process's resident high-water mark, reset first (torch's allocator is invisible
to tracemalloc).
"""
from __future__ import annotations

import gc
import time
import tracemalloc
from unittest import mock

import msgpack
import pytest
import torch
import zstandard

from specmesh.runtime import codec, sparse_wire, wire_rules
from specmesh.runtime.codec import CodecConfig, ProtocolError, WireLimits, decode, encode
from specmesh.runtime.messages import DraftProposal, StageFrame
from specmesh.runtime.sparse import SparseDist, dense, quantise_fp16, top_k

MB = 1 << 20
BUDGET_BYTES = 64 * MB  # the goal: no frame costs more than this over its own size ...
BUDGET_S = 2.0  # ... nor more than ~1 s (2 s under tracemalloc on a shared machine)
QWEN_VOCAB = 151_936
ZSTD = bytes([codec.PROTOCOL_VERSION, codec.FLAG_ZSTD])


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def cost(frame: bytes, **kwargs) -> tuple[ProtocolError, float, int]:
    """Decodes ``frame``, which must be refused; returns the error, seconds and peak bytes used."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    rss = _rss("VmRSS")
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ProtocolError) as info:
            decode(frame, **kwargs)
    finally:
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return info.value, seconds, max(peak, _rss("VmHWM") - rss)


def zstd_frame(body: bytes) -> bytes:
    return ZSTD + zstandard.ZstdCompressor(level=19).compress(body)


def proposal_body(q_sparse: list, candidates: bytes = b"\x00\x00\x00\x00") -> bytes:
    return msgpack.packb([2, "s", 1, 0, b"", candidates, [], [], q_sparse, 0.0], use_bin_type=True)


def varint_bomb(continuation_bytes: int) -> bytes:
    """A one-entry q whose index buffer is ``continuation_bytes`` of 0x80 then 0x00."""
    probs = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    q = [1000, 1, [1], codec.DTYPE_CODES[torch.float16], codec.INDEX_DELTA_VARINT,
         b"\x80" * continuation_bytes + b"\x00", probs]
    return zstd_frame(proposal_body(q))


def test_varint_bomb_of_the_issue_is_refused_cheaply():
    frame = varint_bomb(128 * MB)
    assert len(frame) < 8192
    _, seconds, peak = cost(frame)
    assert seconds < BUDGET_S and peak < BUDGET_BYTES


def test_varint_bomb_within_the_inflate_bound_is_refused_by_the_declared_count():
    frame = varint_bomb(12 * MB)  # inflates within the 16 MiB floor: the varint rule must catch it
    error, seconds, peak = cost(frame)
    assert "PROPOSAL.q.indices" in str(error) and "cannot hold 1 ids" in str(error)
    assert seconds < BUDGET_S and peak < BUDGET_BYTES


@pytest.mark.parametrize("outer, inner", [(4096, 4096), (4096, 3000)])
def test_empty_list_bomb_is_refused_cheaply(outer, inner):
    # parents: an array of arrays of empty arrays (msgpack 0x90): 16M Python lists once built.
    nest = bytes([0xDC]) + outer.to_bytes(2, "big") + (bytes([0xDC]) + inner.to_bytes(2, "big")
                                                        + b"\x90" * inner) * outer
    body = msgpack.packb([2, "s", 1, 0, b"", b""], use_bin_type=True)
    body = bytes([0x9A]) + body[1:] + nest + msgpack.packb([]) + b"\x90" + msgpack.packb(0.0)
    frame = zstd_frame(body)
    assert len(frame) < 4096
    error, seconds, peak = cost(frame)
    assert seconds < BUDGET_S and peak < BUDGET_BYTES
    if len(body) < WireLimits().inflate_floor_bytes:  # reaches the typed decoder, which names it
        assert "PROPOSAL.parents[0]" in str(error)


@pytest.mark.parametrize("tag, name", [(codec.Tag.VERIFY_RESULT, "VERIFY_RESULT"),
                                       (codec.Tag.STAGE_FRAME, "STAGE_FRAME")])
def test_long_top_level_array_is_refused_before_its_items_are_built(tag, name):
    body = bytes([0xDD]) + (1 << 24).to_bytes(4, "big") + bytes([tag]) + b"\x90" * (12 * MB)
    error, seconds, peak = cost(zstd_frame(body))
    assert name in str(error) and seconds < BUDGET_S and peak < BUDGET_BYTES


@pytest.mark.parametrize("rows", [220, 30])
def test_dense_bomb_is_refused_cheaply(rows):
    probs = torch.full((rows, QWEN_VOCAB), 1.0 / QWEN_VOCAB)
    body = msgpack.packb([3, "s", 1, 0, b"", bytes(4 * rows), [], [], QWEN_VOCAB,
                          probs.numpy().tobytes(), 0.0], use_bin_type=True)
    frame = zstd_frame(body)
    assert len(frame) < 64 * 1024
    _, seconds, peak = cost(frame)
    assert seconds < BUDGET_S and peak < BUDGET_BYTES
    raw = bytes([codec.PROTOCOL_VERSION, 0]) + body  # uncompressed: past the inflate bound
    error, seconds, peak = cost(raw)
    assert "PROPOSAL_DENSE" in str(error) and seconds < BUDGET_S and peak < BUDGET_BYTES + len(raw)


def test_largest_dense_q_decodes_within_the_budget():
    rows = WireLimits().max_dense_cells // QWEN_VOCAB  # 27 rows of a full vocabulary
    q = dense(torch.full((rows, QWEN_VOCAB), 1.0 / QWEN_VOCAB))
    frame = encode(DraftProposal("s", 1, 0, [], torch.arange(rows), q))
    assert frame[1] == codec.FLAG_ZSTD and len(frame) < 1 * MB  # uniform rows compress well
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss = _rss("VmRSS")
    got = decode(frame)
    assert _rss("VmHWM") - rss < BUDGET_BYTES
    assert torch.equal(got.q.probs, q.probs)


def test_padding_bomb_is_bounded_by_max_sparse_cells():
    # 27 rows of one entry each, padded to a full vocabulary's width in memory.
    rows = WireLimits().max_sparse_cells // QWEN_VOCAB
    probs = torch.ones(rows, dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    q = [QWEN_VOCAB, QWEN_VOCAB, [1] * rows, codec.DTYPE_CODES[torch.float16], codec.INDEX_UINT32,
         bytes(4 * rows), probs]
    frame = bytes([codec.PROTOCOL_VERSION, 0]) + proposal_body(q, bytes(4 * rows))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss = _rss("VmRSS")
    start = time.perf_counter()
    got = decode(frame)  # legitimate, if wasteful: allocates 12 bytes a cell, nothing more
    assert time.perf_counter() - start < BUDGET_S and _rss("VmHWM") - rss < BUDGET_BYTES
    assert got.q.width == QWEN_VOCAB
    q[2] = [1] * (rows + 1)  # one row more is over the limit (with a candidate for it)
    frame = bytes([codec.PROTOCOL_VERSION, 0]) + proposal_body(q, bytes(4 * (rows + 1)))
    error, seconds, peak = cost(frame)
    assert "max_sparse_cells" in str(error) and peak < BUDGET_BYTES


def test_compressible_valid_frame_cannot_inflate_past_the_bound():
    # A valid stage frame of zero hidden states: 64 MiB in a few kilobytes.
    proposal = DraftProposal("s", 1, 0, [1], torch.zeros(0, dtype=torch.int64), SparseDist.empty(10))
    hidden = torch.zeros(1, 32 * MB, dtype=torch.float16)
    body = encode(StageFrame(proposal, hidden), CodecConfig(compress_threshold=None))[2:]
    error, seconds, peak = cost(zstd_frame(body))
    assert "inflate" in str(error) and peak < BUDGET_BYTES


def test_a_body_larger_than_its_type_can_hold_is_refused_before_parsing():
    text = "x" * 60_000  # each string within max_str_bytes
    frame = bytes([codec.PROTOCOL_VERSION, 0]) + msgpack.packb([8, text, 1, text, text])
    assert decode(frame).code == text
    with pytest.raises(ProtocolError, match="can hold"):  # not "trailing bytes": refused unparsed
        decode(frame + b"\xa1" * 20_000)


# ------------------------------------------------------------------------- q rides through


def _stage_frame() -> tuple[StageFrame, bytes]:
    gen = torch.Generator().manual_seed(0)
    q = quantise_fp16(top_k(torch.softmax(3 * torch.randn(3, 500, generator=gen), -1), 8))
    proposal = DraftProposal("s", 4, 10, [7, 8], q.indices[:, 0].clone(), q, [-1, 0, 0], [0])
    frame = StageFrame(proposal, torch.randn(5, 16).to(torch.bfloat16), [1.5])
    return frame, encode(frame, CodecConfig(compress_threshold=None))


def test_a_middle_stage_passes_q_on_without_decoding_it():
    frame, data = _stage_frame()
    with mock.patch.object(sparse_wire, "sparse_from_wire", side_effect=AssertionError("q decoded")), \
            mock.patch.object(codec, "sparse_from_wire", side_effect=AssertionError("q decoded")), \
            mock.patch.object(wire_rules, "sparse_from_wire", side_effect=AssertionError("q decoded")), \
            mock.patch.object(wire_rules, "dense_from_wire", side_effect=AssertionError("q decoded")), \
            mock.patch.object(sparse_wire, "sparse_to_wire", side_effect=AssertionError("q encoded")), \
            mock.patch.object(codec, "sparse_to_wire", side_effect=AssertionError("q encoded")):
        got = decode(data, vocab_size=500)  # a middle stage: reads the header, runs its layers ...
        assert (got.proposal.round, got.proposal.context) == (4, [7, 8])
        hidden = got.hidden * 2  # ... and hands the frame on
        out = encode(StageFrame(got.proposal, hidden, got.stage_ms + [2.0]), CodecConfig(compress_threshold=None))
    q_in, q_out = msgpack.unpackb(data[2:])[1][8], msgpack.unpackb(out[2:])[1][8]
    assert q_out == q_in  # the very bytes
    assert msgpack.packb(msgpack.unpackb(out[2:])[1]) == msgpack.packb(msgpack.unpackb(data[2:])[1])
    last = decode(out, vocab_size=500)  # the last stage reads q: decoded then, bit for bit
    assert torch.equal(last.proposal.q.probs, frame.proposal.q.probs)
    assert torch.equal(last.proposal.q.indices, frame.proposal.q.indices)


def test_a_deferred_q_is_checked_when_read():
    frame, data = _stage_frame()
    fields = msgpack.unpackb(data[2:])
    fields[1][8][2] = [8, 8]  # two rows for three candidates: only the reader of q can tell
    bad = bytes([codec.PROTOCOL_VERSION, 0]) + msgpack.packb(fields, use_bin_type=True)
    got = decode(bad)
    with pytest.raises(ProtocolError, match=r"STAGE_FRAME\.proposal\.q\.row_lengths"):
        got.proposal.q
    with pytest.raises(ProtocolError, match="row_lengths"):
        got.proposal.q  # every read, not only the first
