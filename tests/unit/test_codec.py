"""Round trips of every message through the wire codec, tensors bit for bit, and the frame format."""
from __future__ import annotations

import math
import struct
import threading

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specmesh.runtime import codec, sparse
from specmesh.runtime.codec import CodecConfig, ProtocolError, decode, encode
from specmesh.runtime.messages import (
    DraftProposal,
    ErrorMessage,
    OpenSession,
    SamplingParams,
    StageFrame,
    VerifyResult,
)
from specmesh.runtime.sparse import SparseDist
from specmesh.runtime.sparse import quantise_fp16 as quantise_sparse

QWEN_VOCAB = 151_936
EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT64_MAX = (1 << 63) - 1
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}

session_ids = st.text(max_size=24)
rounds = st.integers(0, INT64_MAX)


def random_dist(seed: int, rows: int, width: int, vocab: int, sharpness: float = 3.0) -> SparseDist:
    """``rows`` distributions over ``width`` distinct random token ids, peaked like a draft's."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(sharpness * torch.randn(rows, width, generator=gen), dim=-1)
    indices = torch.stack([torch.randperm(vocab, generator=gen)[:width] for _ in range(rows)]) \
        if rows else torch.zeros(0, width, dtype=torch.int64)
    return SparseDist(indices, probs, vocab)


def draw(q: SparseDist, seed: int) -> torch.Tensor:
    """One token per row of ``q``, as the draft worker draws it: ``[n]`` int64."""
    if q.num_positions == 0:
        return torch.zeros(0, dtype=torch.int64)
    pick = torch.multinomial(q.probs, 1, generator=torch.Generator().manual_seed(seed))
    return q.indices.gather(1, pick).view(-1)


@st.composite
def proposals(draw_, dense: bool = False, max_vocab: int = 5000) -> DraftProposal:
    """Chain or tree proposals whose candidates are drawn from the q they carry."""
    vocab = draw_(st.integers(1, max_vocab))
    seed = draw_(st.integers(0, 2**31))
    if dense:
        g = draw_(st.integers(1, 6))
        gen = torch.Generator().manual_seed(seed)
        q = sparse.dense(torch.softmax(3 * torch.randn(g, vocab, generator=gen), dim=-1))
    else:
        g = draw_(st.integers(0, 6))
        width = draw_(st.integers(1, min(vocab, 12)))
        q = quantise_sparse(random_dist(seed, g, width, vocab, draw_(st.floats(0.0, 8.0))))
    parents = [draw_(st.integers(-1, i - 1)) for i in range(g)] if draw_(st.booleans()) else []
    return DraftProposal(
        session_id=draw_(session_ids), round=draw_(rounds), rollback=draw_(st.integers(0, 1 << 40)),
        context=draw_(st.lists(st.integers(0, vocab - 1), max_size=20)),
        candidates=draw(q, seed), q=q, parents=parents,
        prev_path=draw_(st.lists(st.integers(0, 64), max_size=6)))


def assert_same_dist(a: SparseDist, b: SparseDist) -> None:
    assert a.vocab_size == b.vocab_size
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.probs, b.probs)  # bit for bit, not approximately


def assert_same_proposal(got: DraftProposal, want: DraftProposal) -> None:
    assert (got.session_id, got.round, got.rollback, got.context, got.parents, got.prev_path) == \
        (want.session_id, want.round, want.rollback, want.context, want.parents, want.prev_path)
    assert got.candidates.dtype == torch.int64 and torch.equal(got.candidates, want.candidates.long())
    assert_same_dist(got.q, quantise_sparse(want.q))


# ----------------------------------------------------------------------------- round trips


@EXAMPLES
@given(proposals(), st.sampled_from(["delta-varint", "uint32"]), st.sampled_from([None, 0]))
def test_proposal_round_trip_gives_the_quantised_q(msg, index_coding, threshold):
    config = CodecConfig(index_coding=index_coding, compress_threshold=threshold)
    got = decode(encode(msg, config), vocab_size=msg.q.vocab_size)
    assert isinstance(got, DraftProposal)
    assert got.q.width == msg.q.width and got.q.num_positions == msg.num_candidates
    assert_same_dist(got.q, quantise_sparse(msg.q))


@EXAMPLES
@given(proposals(dense=True, max_vocab=300))
def test_dense_q_goes_as_the_dense_message_with_fp32_bits_intact(msg):
    frame = encode(msg, CodecConfig(compress_threshold=None))
    assert _tag(frame) == codec.Tag.PROPOSAL_DENSE
    got = decode(frame)
    assert_same_proposal(got, msg)
    assert torch.equal(got.q.probs, msg.q.probs)  # fp32 travels unchanged


@EXAMPLES
@given(st.integers(0, 2**31), st.integers(1, 8), st.integers(1, 64),
       st.sampled_from(["delta-varint", "uint32"]))
def test_quantise_sparse_is_idempotent_so_the_sender_may_send_what_it_sampled(seed, rows, width,
                                                                              index_coding):
    config = CodecConfig(index_coding=index_coding)
    q = random_dist(seed, rows, width, 10_000, sharpness=float(seed % 9))
    once = quantise_sparse(q)
    assert_same_dist(quantise_sparse(once), once)
    msg = DraftProposal("s", 1, 0, [], draw(once, seed), once)
    assert_same_dist(decode(encode(msg, config)).q, once)
    # a proper distribution close to q: sums to 1 to float32 precision, total variation tiny
    assert torch.allclose(once.probs.double().sum(1), torch.ones(rows, dtype=torch.float64), atol=1e-6)
    tv = 0.5 * (once.to_dense() - q.to_dense()).abs().sum(1)
    assert float(tv.max()) <= 2.0**-10


@EXAMPLES
@given(st.integers(1, 40), st.integers(0, 2**31))
def test_fp16_rows_at_rounding_midpoints_still_encode(width, seed):
    # Every value exactly halfway between two fp16 numbers: round to nearest drifts the most here.
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(3, width, generator=gen).half()
    high = (low.view(torch.int16) + 1).view(torch.float16)
    mid = (low.double() + high.double()) / 2
    q = SparseDist(torch.arange(width).expand(3, width).contiguous(), (mid / mid.sum(1, keepdim=True)).float(),
                   width + 1)
    once = quantise_sparse(q)
    assert_same_dist(quantise_sparse(once), once)


@EXAMPLES
@given(proposals(), st.sampled_from(FLOAT_DTYPES), st.integers(0, 48),
       st.lists(st.floats(0, 1e6), max_size=4))
def test_stage_frame_hidden_states_are_bit_exact(proposal, dtype, hidden_size, stage_ms):
    fed = len(proposal.context) + proposal.num_candidates
    bits = torch.randint(-(2**15), 2**15, (fed, hidden_size), dtype=torch.int32)
    hidden = _finite_or_inf(bits, dtype)
    got = decode(encode(StageFrame(proposal, hidden, stage_ms)))
    assert got.hidden.dtype == dtype and got.hidden.shape == hidden.shape
    assert torch.equal(got.hidden.view(INT_BITS[dtype]), hidden.view(INT_BITS[dtype]))
    assert got.stage_ms == stage_ms
    assert_same_proposal(got.proposal, proposal)


def _finite_or_inf(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Random bit patterns as ``dtype``, NaNs replaced by +inf (so +-inf, subnormals, -0 all occur)."""
    if dtype == torch.float32:
        values = (bits * 65_537).view(torch.float32)
    else:
        values = bits.to(torch.int16).view(dtype)
    return torch.where(torch.isnan(values), torch.tensor(float("inf"), dtype=dtype), values)


@EXAMPLES
@given(session_ids, rounds, st.integers(0, 16), st.integers(0, 2**32 - 1),
       st.lists(st.booleans(), max_size=16), st.lists(st.integers(0, 100), max_size=8),
       st.lists(st.floats(0, 1e9), max_size=8))
def test_verify_result_round_trip(session, round_, accepted, token, mask, path, stage_ms):
    msg = VerifyResult(session, round_, accepted, [token] * (accepted + 1), mask, path, stage_ms)
    assert decode(encode(msg)) == msg


@EXAMPLES
@given(session_ids, rounds, st.text(max_size=40), st.text(max_size=300))
def test_error_messages_round_trip(session, round_, code, text):
    for msg in (ErrorMessage(session, round_, code, text), ErrorMessage(session, -1, code, text)):
        assert decode(encode(msg)) == msg


policy_keys = st.from_regex(r"[a-z][a-z0-9_]{0,63}", fullmatch=True)
policy_values = st.one_of(st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1),
                          st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=256))


@EXAMPLES
@given(session_ids, st.floats(0, 100), st.integers(0, 1000), st.floats(1e-6, 1.0),
       st.integers(-(1 << 63), (1 << 64) - 1), st.dictionaries(policy_keys, policy_values, max_size=64))
def test_open_session_round_trip(session, temperature, top_k, top_p, seed, policy):
    msg = OpenSession(session, SamplingParams(temperature, top_k, top_p, seed), policy)
    got = decode(encode(msg))
    assert got == msg
    # bool stays bool, int stays int, float stays float: the policy map keeps its value types
    assert {k: type(v) for k, v in got.policy.items()} == {k: type(v) for k, v in policy.items()}


@EXAMPLES
@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 40))
def test_float32_q_travels_unchanged(seed, rows, width):
    q = random_dist(seed, rows, width, 50_000)
    msg = DraftProposal("s", 1, 0, [], draw(q, seed), q)
    got = decode(encode(msg, CodecConfig(prob_dtype=torch.float32)))
    assert torch.equal(got.q.to_dense(), q.to_dense())  # no fp16 rounding on this path


# ------------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("dtype", list(codec.DTYPE_CODES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (2, 3, 5)])
def test_tensor_round_trip_empty_scalar_and_nd(dtype, shape):
    tensor = (torch.arange(math.prod(shape)) % 7).to(dtype).reshape(shape)
    got = codec.tensor_from_wire(codec.tensor_to_wire(tensor))
    assert got.dtype == dtype and got.shape == tensor.shape and torch.equal(got, tensor)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_contiguous_tensors_arrive_in_logical_order(dtype):
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5).to(dtype)
    for view in (base.transpose(0, 2), base[:, ::2, 1:], base[:1].expand(3, 4, 5), base[..., 0]):
        assert not view.is_contiguous()
        got = codec.tensor_from_wire(msgpack.unpackb(msgpack.packb(codec.tensor_to_wire(view))))
        assert got.is_contiguous() and torch.equal(got, view)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_infinities_cross_in_hidden_states_but_nan_does_not(dtype):
    proposal = DraftProposal("s", 0, 0, [1, 2], torch.zeros(0, dtype=torch.int64), SparseDist.empty(10))
    hidden = torch.tensor([[float("inf"), -float("inf"), 0.0], [-0.0, 1.0, -2.5]], dtype=dtype)
    got = decode(encode(StageFrame(proposal, hidden)))
    assert torch.equal(got.hidden.view(INT_BITS[dtype]), hidden.view(INT_BITS[dtype]))
    with pytest.raises(ProtocolError, match="NaN"):
        encode(StageFrame(proposal, hidden.clone().fill_(float("nan"))))


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -0.25])
def test_probabilities_must_be_finite_and_non_negative(bad):
    probs = torch.tensor([[0.5, 0.5, 0.0]])
    probs[0, 2] = bad
    q = SparseDist(torch.tensor([[1, 2, 3]]), probs, 10)
    with pytest.raises(ProtocolError):
        encode(DraftProposal("s", 0, 0, [], torch.tensor([1]), q))


# ------------------------------------------------------------------------- frame format


def test_reference_proposal_size_follows_from_the_format():
    """One chain proposal, sized byte by byte from the format (nothing copied from a run)."""
    ids = [5, 100, 1000, 150_000]  # varint gaps 5, 95, 900, 149000: 1 + 1 + 2 + 3 bytes
    q = SparseDist(torch.tensor([ids] * 3), torch.tensor([[0.5, 0.25, 0.125, 0.125]] * 3), QWEN_VOCAB)
    msg = DraftProposal("s", 7, 100, [42], torch.tensor([5, 100, 150_000]), q)
    body = (
        1  # fixarray of 10 fields
        + 1 + 2 + 1 + 1  # tag 2, fixstr "s", round 7, rollback 100 (positive fixints)
        + 2 + 4  # context: bin8 header + one uint32
        + 2 + 12  # candidates: bin8 header + three uint32
        + 1 + 1  # parents [], prev_path []
        + 1  # sparse q: fixarray of 7
        + 5 + 1 + (1 + 3)  # vocab 151936 (uint32 marker + 4), width 4, row lengths [4, 4, 4]
        + 1 + 1  # probability dtype code, index coding code
        + 2 + 3 * 7  # indices: bin8 header + 7 varint bytes per row
        + 2 + 12 * 2  # probabilities: bin8 header + 12 float16
        + 9  # draft_ms: float64
    )
    frame = encode(msg)
    assert len(frame) == 2 + body == 101  # 2-byte header (version, flags); body below 1024: raw
    assert frame[:2] == bytes([codec.PROTOCOL_VERSION, 0])
    uint32_frame = encode(msg, CodecConfig(index_coding="uint32"))
    assert len(uint32_frame) == len(frame) - (3 * 7) + (3 * 4 * 4)  # four bytes per id instead


def test_verify_result_frame_is_byte_for_byte_the_documented_layout():
    frame = encode(VerifyResult("ab", 200, 1, [7, 300], [True, False], [], [0.5]))
    # version 2, flags 0, fixarray(9), tag 5, fixstr(2) "ab", round as uint8 (0xcc) 200, accepted 1,
    # tokens as bin8 of two uint32, mask [true, false], path [], stage_ms [float64 0.5], draft_ms 0.0
    assert frame == (bytes([2, 0, 0x99, 5, 0xA2]) + b"ab" + bytes([0xCC, 200, 1, 0xC4, 8])
                     + (7).to_bytes(4, "little") + (300).to_bytes(4, "little")
                     + bytes([0x92, 0xC3, 0xC2, 0x90, 0x91, 0xCB]) + struct.pack(">d", 0.5)
                     + bytes([0xCB]) + struct.pack(">d", 0.0))


def test_zstd_only_above_the_threshold_and_only_when_it_helps():
    hidden = torch.zeros(64, 64, dtype=torch.bfloat16)  # compressible
    proposal = DraftProposal("s", 0, 0, list(range(64)), torch.zeros(0, dtype=torch.int64),
                             SparseDist.empty(100))
    big = StageFrame(proposal, hidden)
    assert encode(big)[1] == codec.FLAG_ZSTD
    assert encode(big, CodecConfig(compress_threshold=None))[1] == 0
    assert encode(big, CodecConfig(compress_threshold=1 << 20))[1] == 0
    noise = StageFrame(proposal, torch.randn(64, 64).to(torch.bfloat16))
    raw = encode(noise, CodecConfig(compress_threshold=None))
    assert len(encode(noise)) <= len(raw)
    assert torch.equal(decode(encode(noise)).hidden, noise.hidden)
    assert torch.equal(decode(encode(big)).hidden, hidden)


def test_encode_refuses_what_the_receiver_would_refuse():
    q = quantise_sparse(random_dist(0, 2, 4, 100))
    outside = [t for t in range(100) if t not in q.indices[1].tolist()][0]
    cases = [
        DraftProposal("s", 0, 0, [], torch.tensor([int(q.indices[0, 0]), outside]), q),  # q(x) = 0
        DraftProposal("s", 0, 0, [100], draw(q, 0), q),  # context id outside the vocabulary
        DraftProposal("s", -1, 0, [], draw(q, 0), q),  # negative round
        DraftProposal("s", 0, 0, [], draw(q, 0), q, parents=[0, 1]),  # a node its own parent
        DraftProposal("s", 0, 0, [], draw(q, 0)[:1], q),  # rows and candidates disagree
        VerifyResult("s", 0, 2, [1, 2]),  # accepted + 1 tokens required
        ErrorMessage("s", 0, "x" * 70_000, ""),  # string above max_str_bytes
    ]
    for i, msg in enumerate(cases):
        with pytest.raises(ProtocolError):
            encode(msg)
            pytest.fail(f"case {i} was encoded")
    with pytest.raises(ProtocolError):
        encode("not a message")  # type: ignore[arg-type]


def test_receiver_vocabulary_is_enforced():
    q = quantise_sparse(random_dist(1, 1, 4, 1000))
    frame = encode(DraftProposal("s", 0, 0, [999], draw(q, 1), q))
    assert decode(frame, vocab_size=1000).q.vocab_size == 1000
    with pytest.raises(ProtocolError, match="vocabulary"):
        decode(frame, vocab_size=999)
    with pytest.raises(ProtocolError, match="vocabulary"):
        decode(encode(VerifyResult("s", 0, 0, [1000])), vocab_size=1000)


@pytest.mark.parametrize("kwargs", [
    {"compress_threshold": -1}, {"compress_level": 0}, {"compress_level": 23},
    {"prob_dtype": torch.bfloat16}, {"index_coding": "zigzag"}, {"limits": None},
])
def test_codec_config_validates(kwargs):
    with pytest.raises((ValueError, TypeError)):
        CodecConfig(**kwargs)
    with pytest.raises(ValueError):
        codec.WireLimits(max_frame_bytes=0)


def test_one_compressor_per_thread_under_concurrency():
    proposal = DraftProposal("s", 0, 0, list(range(32)), torch.zeros(0, dtype=torch.int64),
                             SparseDist.empty(100))
    frames = [StageFrame(proposal, torch.full((32, 64), float(i), dtype=torch.bfloat16)) for i in range(8)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                assert torch.equal(decode(encode(frames[i])).hidden, frames[i].hidden)
        except BaseException as exc:  # surfaced below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(frames))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _tag(frame: bytes) -> int:
    assert frame[1] == 0, "test frames are expected below the compression threshold"
    return msgpack.unpackb(frame[2:])[0]
