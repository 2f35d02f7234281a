"""The one wire codec of SpecMesh: every message of :mod:`specmesh.runtime.messages` to and from bytes.

Frame (all multi-byte numbers little-endian)::

    byte 0     PROTOCOL_VERSION
    byte 1     flags: bit 0 set = the body is one zstd frame (with its content size); other bits 0
    bytes 2..  body: a msgpack array ``[tag, field, field, ...]``, fields positional (no maps)

Tags and fields (``ids`` = token ids as a uint32 buffer, ``sparse`` = see below)::

    1 OPEN_SESSION   session_id, [temperature, top_k, top_p, seed, acceptance, sparsifier,
                                  sparse_k, sparse_mass]
    2 PROPOSAL       session_id, round, rollback, context ids, candidate ids, parents, prev_path, sparse q
    3 PROPOSAL_DENSE session_id, round, rollback, context ids, candidate ids, parents, prev_path,
                     vocab_size, q as a float32 buffer [g, vocab_size]    (the papers' dense baseline)
    4 STAGE_FRAME    proposal body (tag 2 or 3, nested), hidden tensor, stage_ms
    5 VERIFY_RESULT  session_id, round, accepted, token ids, accepted_mask, path, stage_ms
    6 SPLIT_PAYLOAD  session_id, round, accepted, sparse p (always float32: it is the target's p)
    7 COMMIT         session_id, round, keep
    8 ERROR          session_id, round, code, text

A tensor is ``[dtype code, shape, buffer]``. A sparse distribution is ``[vocab_size, width, row_lengths,
prob dtype code, index coding, indices, probs]``: only the entries of positive probability are sent
(row_lengths of them per row), left-aligned and re-padded to ``width`` with (index 0, probability 0)
on receipt. Indices are uint32, or (default) sorted within the row and sent as LEB128 varints of the
gaps between them: ~2 bytes instead of 4 for a top-16 row of a 151,936-token vocabulary.

float16 probabilities are divided by their row sum on receipt. The encoder picks the fp16 values so
that the sum is within ``FP16_SUM_TOLERANCE`` (about 2**-12) of 1, close enough that every renormalised
value still rounds back to the same fp16: ``quantise_sparse`` is idempotent, and a draft worker may
send the very q it sampled from and the receiver rebuilds it bit for bit (lossless needs the sender to
sample from exactly the q the verifier uses). The row sum is exact in float64 (fp16 values are
multiples of 2**-24), so sender and receiver agree bit for bit on any machine. float32 probabilities
travel unchanged.

Every malformed, oversized or inconsistent input raises :class:`ProtocolError` and nothing else.
"""
from __future__ import annotations

import math
import struct
import sys
import threading
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, Sequence

import msgpack
import numpy as np
import torch
import zstandard

from .messages import (
    Commit,
    DraftProposal,
    ErrorMessage,
    OpenSession,
    SamplingParams,
    SplitPayload,
    StageFrame,
    VerifyResult,
)
from .sparse import SparseDist

PROTOCOL_VERSION = 1
FLAG_ZSTD = 0x01
_HEADER = struct.Struct("<BB")  # version, flags
_KNOWN_FLAGS = FLAG_ZSTD
_INT64_MAX = (1 << 63) - 1
_UINT32_LIMIT = 1 << 32
_MIB = 1 << 20
# A float16 row must sum to 1 within this. Dividing a row by a sum this close to 1 moves every value
# by less than half the gap to its fp16 neighbour (>= 2**-12 of the value), with 2**-16 to spare for
# float32 rounding, so a decoded row re-encodes to the very same fp16 values.
FP16_SUM_TOLERANCE = 2.0**-12 - 2.0**-16
_FP16_SMALLEST = 2.0**-24  # smallest positive (subnormal) float16
# Repair jumps the encoder may make on one row; two suffice (a coarse one, then a fine one).
_FIXUP_MAX_JUMPS = 8

if sys.byteorder != "little":  # buffers are the host's memory; the wire is little-endian
    raise ImportError("specmesh.runtime.codec supports little-endian hosts only")


class ProtocolError(ValueError):
    """A frame or message violates the wire protocol; the message says what was wrong."""


class Tag(IntEnum):
    """Message type tags (first element of every body)."""

    OPEN_SESSION = 1
    PROPOSAL = 2
    PROPOSAL_DENSE = 3
    STAGE_FRAME = 4
    VERIFY_RESULT = 5
    SPLIT_PAYLOAD = 6
    COMMIT = 7
    ERROR = 8


# Wire codes of tensor dtypes. bool is left out on purpose: a byte other than 0/1 would be an
# invalid bool that torch does not check.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.uint8: 1,
    torch.int8: 2,
    torch.int16: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.uint16: 6,
    torch.uint32: 7,
    torch.float16: 10,
    torch.bfloat16: 11,
    torch.float32: 12,
    torch.float64: 13,
}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
HIDDEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Sparse token ids: plain uint32, or per row sorted, gap-coded and written as LEB128 varints (a top-16
# row of a 151,936-token vocabulary then takes ~2 bytes per id instead of 4).
INDEX_UINT32 = 0
INDEX_DELTA_VARINT = 1
INDEX_CODINGS = {"uint32": INDEX_UINT32, "delta-varint": INDEX_DELTA_VARINT}
_VARINT_BITS = 7
_VARINT_MASK = (1 << _VARINT_BITS) - 1
_VARINT_MORE = 1 << _VARINT_BITS  # continuation bit
_VARINT_MAX_BYTES = 4  # 28 bits hold any id below max_vocab_size = 2**24
PROB_DTYPES = (torch.float16, torch.float32)


@dataclass(frozen=True)
class WireLimits:
    """Bounds that a decoder enforces before it allocates anything (all sizes in bytes)."""

    max_frame_bytes: int = 128 * _MIB  # whole frame as received
    max_decompressed_bytes: int = 128 * _MIB  # body after zstd (zstd bombs stop here)
    max_str_bytes: int = 64 * 1024  # any string (session id, error text)
    max_list_len: int = 4096  # any msgpack array; also candidates per round
    max_tokens: int = 1 << 20  # token ids in one field (a whole prompt in round 1)
    max_vocab_size: int = 1 << 24  # keeps fp16 rows of a full vocabulary renormalisable
    max_tensor_dims: int = 8
    # rows x width of a decoded sparse distribution: it is padded in memory (12 bytes a cell), so a
    # few wire bytes could otherwise demand gigabytes. 4M cells: a 16-node tree of 151,936-wide rows.
    max_sparse_cells: int = 1 << 22
    # float32 rows must sum to 1 within this. A float32 softmax over V entries can be off by up to
    # V * 2**-24 (9e-3 for Qwen's 151,936; measured up to 2e-4 on peaked rows).
    prob_sum_tolerance: float = 1e-2

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_decompressed_bytes", "max_str_bytes", "max_list_len",
                     "max_tokens", "max_vocab_size", "max_tensor_dims", "max_sparse_cells"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"WireLimits.{name} must be an int >= 1, got {value!r}")
        if self.max_vocab_size > 1 << 24:
            raise ValueError(f"max_vocab_size must be <= 2**24, got {self.max_vocab_size}")
        if not 0.0 < self.prob_sum_tolerance < 1.0:
            raise ValueError(f"prob_sum_tolerance must be in (0, 1), got {self.prob_sum_tolerance}")


@dataclass(frozen=True)
class CodecConfig:
    """How a sender encodes; decoders accept every variant, so peers may differ.

    Attributes:
        compress_threshold: bodies of at least this many bytes are zstd-compressed (kept only if
            smaller); ``None`` never compresses.
        compress_level: zstd level, 1..22.
        prob_dtype: wire dtype of sparse q probabilities, float16 (default) or float32.
        index_coding: sparse token ids as ``"delta-varint"`` (default) or ``"uint32"``.
        limits: the bounds checked on encode (fail at the sender) and by :func:`decode`.
    """

    compress_threshold: int | None = 1024
    compress_level: int = 3
    prob_dtype: torch.dtype = torch.float16
    index_coding: str = "delta-varint"
    limits: WireLimits = field(default_factory=WireLimits)

    def __post_init__(self) -> None:
        if self.compress_threshold is not None and (
            type(self.compress_threshold) is not int or self.compress_threshold < 0
        ):
            raise ValueError(f"compress_threshold must be None or an int >= 0, got "
                             f"{self.compress_threshold!r}")
        if type(self.compress_level) is not int or not 1 <= self.compress_level <= 22:
            raise ValueError(f"compress_level must be an int in 1..22, got {self.compress_level!r}")
        if self.prob_dtype not in PROB_DTYPES:
            raise ValueError(f"prob_dtype must be one of {PROB_DTYPES}, got {self.prob_dtype}")
        if self.index_coding not in INDEX_CODINGS:
            raise ValueError(f"index_coding must be one of {list(INDEX_CODINGS)}, got {self.index_coding!r}")
        if not isinstance(self.limits, WireLimits):
            raise TypeError(f"limits must be a WireLimits, got {type(self.limits).__name__}")


    @property
    def index_code(self) -> int:
        return INDEX_CODINGS[self.index_coding]


DEFAULT_CONFIG = CodecConfig()
DEFAULT_LIMITS = DEFAULT_CONFIG.limits

Message = OpenSession | DraftProposal | StageFrame | VerifyResult | SplitPayload | Commit | ErrorMessage

# One zstd (de)compressor per thread: they are not thread-safe, and reusing one keeps its context.
_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


# ---------------------------------------------------------------------------------------- frames


def encode(msg: Message, config: CodecConfig = DEFAULT_CONFIG) -> bytes:
    """Encodes one message into a frame.

    Raises:
        ProtocolError: the message cannot be represented (ids out of range, q not a distribution,
            a candidate with q = 0 after quantisation, a limit exceeded...).
    """
    if type(msg) not in _ENCODERS:
        raise ProtocolError(f"cannot encode {type(msg).__name__}: not a SpecMesh message")
    limits = config.limits
    try:
        body = msgpack.packb(_ENCODERS[type(msg)](msg, config), use_bin_type=True)
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError, AttributeError, RuntimeError) as exc:
        # A field of the wrong type (a str where ids belong, say) is the sender's protocol error.
        raise ProtocolError(f"cannot encode {type(msg).__name__}: {type(exc).__name__}: {exc}") from None
    if len(body) > limits.max_decompressed_bytes:
        raise ProtocolError(f"body of {len(body)} bytes exceeds max_decompressed_bytes "
                            f"{limits.max_decompressed_bytes}")
    flags = 0
    if config.compress_threshold is not None and len(body) >= config.compress_threshold:
        packed = _compressor(config.compress_level).compress(body)
        if len(packed) < len(body):  # incompressible bodies go raw
            body, flags = packed, FLAG_ZSTD
    frame = _HEADER.pack(PROTOCOL_VERSION, flags) + body
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds max_frame_bytes "
                            f"{limits.max_frame_bytes}")
    return frame


def decode(data: bytes, *, vocab_size: int | None = None,
           limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Decodes and validates one frame.

    Args:
        data: the frame.
        vocab_size: when given, every vocabulary carried must equal it and every token id must lie
            below it (without it, ids are checked against the message's own vocabulary, if any).
        limits: bounds enforced before allocating.
    Raises:
        ProtocolError: anything wrong with the frame, whatever it is.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"frame must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limits.max_frame_bytes:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds max_frame_bytes {limits.max_frame_bytes}")
    if len(data) < _HEADER.size:
        raise ProtocolError(f"frame of {len(data)} bytes is shorter than the {_HEADER.size}-byte header")
    version, flags = _HEADER.unpack_from(data)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, this codec speaks {PROTOCOL_VERSION}")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x}")
    body = data[_HEADER.size:]
    if flags & FLAG_ZSTD:
        body = _decompress(body, limits.max_decompressed_bytes)
    elif len(body) > limits.max_decompressed_bytes:
        raise ProtocolError(f"body of {len(body)} bytes exceeds max_decompressed_bytes "
                            f"{limits.max_decompressed_bytes}")
    try:
        obj = msgpack.unpackb(
            body, raw=False, use_list=True, strict_map_key=True, ext_hook=_reject_ext,
            max_str_len=limits.max_str_bytes,
            max_bin_len=limits.max_decompressed_bytes, max_array_len=limits.max_list_len,
            max_map_len=0, max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises half a dozen types; the caller needs one
        raise ProtocolError(f"malformed msgpack body: {type(exc).__name__}: {exc}") from None
    fields = _list(obj, "body", 1, limits.max_list_len)
    tag = fields[0]
    if type(tag) is not int or tag not in _DECODERS:
        raise ProtocolError(f"unknown message tag {tag!r}")
    try:
        return _DECODERS[tag](_Reader(fields, Tag(tag).name, vocab_size, limits, start=1))
    except ProtocolError:
        raise
    except (ValueError, TypeError, RuntimeError, OverflowError, IndexError) as exc:
        # A bug-shaped failure in a dataclass or torch must still surface as a protocol error.
        raise ProtocolError(f"{Tag(tag).name}: {type(exc).__name__}: {exc}") from None


def _decompress(body: bytes, max_bytes: int) -> bytes:
    try:
        size = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"bad zstd frame header: {exc}") from None
    if size < 0:  # unknown size: refusing it is what bounds the allocation
        raise ProtocolError("zstd frame does not declare its content size")
    if size > max_bytes:
        raise ProtocolError(f"zstd frame declares {size} bytes, above max_decompressed_bytes {max_bytes}")
    try:
        out = _decompressor().decompress(body, max_output_size=max_bytes, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"corrupt zstd body: {exc}") from None
    if len(out) != size:
        raise ProtocolError(f"zstd body gave {len(out)} bytes, header declared {size}")
    return out


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


# -------------------------------------------------------------------------- field readers


class _Reader:
    """Reads the positional fields of one body in order, checking each one's type and range."""

    def __init__(self, fields: list, name: str, vocab_size: int | None, limits: WireLimits,
                 start: int = 0):
        self.fields, self.name, self.vocab_size, self.limits = fields, name, vocab_size, limits
        self.pos = start  # 1 in a body, whose field 0 is the tag

    def _next(self, what: str) -> Any:
        if self.pos >= len(self.fields):
            raise ProtocolError(f"{self.name}: missing field {what!r} (field {self.pos})")
        self.pos += 1
        return self.fields[self.pos - 1]

    def done(self) -> None:
        if self.pos != len(self.fields):
            raise ProtocolError(f"{self.name}: {len(self.fields)} fields, expected {self.pos}")

    def integer(self, what: str, lo: int = 0, hi: int = _INT64_MAX) -> int:
        return _int(self._next(what), f"{self.name}.{what}", lo, hi)

    def real(self, what: str) -> float:
        value = self._next(what)
        if type(value) is not float or not math.isfinite(value):
            raise ProtocolError(f"{self.name}.{what} must be a finite float, got {value!r}")
        return value

    def text(self, what: str) -> str:
        value = self._next(what)
        if type(value) is not str:
            raise ProtocolError(f"{self.name}.{what} must be a str, got {type(value).__name__}")
        return value

    def raw(self, what: str) -> Any:
        return self._next(what)

    def ints(self, what: str, lo: int, hi: int) -> list[int]:
        values = _list(self._next(what), f"{self.name}.{what}", 0, self.limits.max_list_len)
        return [_int(v, f"{self.name}.{what}[{i}]", lo, hi) for i, v in enumerate(values)]

    def floats(self, what: str) -> list[float]:
        values = _list(self._next(what), f"{self.name}.{what}", 0, self.limits.max_list_len)
        if any(type(v) is not float or not math.isfinite(v) or v < 0 for v in values):
            raise ProtocolError(f"{self.name}.{what} must hold finite floats >= 0, got {values!r}")
        return values

    def bools(self, what: str) -> list[bool]:
        values = _list(self._next(what), f"{self.name}.{what}", 0, self.limits.max_list_len)
        if any(type(v) is not bool for v in values):
            raise ProtocolError(f"{self.name}.{what} must hold bools")
        return values

    def ids(self, what: str, vocab: int | None, max_len: int) -> torch.Tensor:
        """Token ids: a uint32 buffer -> ``[n]`` int64, each below ``vocab`` (or the caller's)."""
        buf = self._next(what)
        label = f"{self.name}.{what}"
        if type(buf) is not bytes or len(buf) % 4:
            raise ProtocolError(f"{label} must be a uint32 buffer, got {_describe(buf)}")
        if len(buf) // 4 > max_len:
            raise ProtocolError(f"{label}: {len(buf) // 4} ids exceed the limit {max_len}")
        ids = torch.from_numpy(np.frombuffer(buf, dtype="<u4").astype(np.int64))
        bound = self.vocab_size if vocab is None else vocab
        if bound is not None and ids.numel() and int(ids.max()) >= bound:
            raise ProtocolError(f"{label}: token id {int(ids.max())} outside the vocabulary of {bound}")
        return ids

    def vocab(self, what: str = "vocab_size") -> int:
        vocab = self.integer(what, 1, self.limits.max_vocab_size)
        if self.vocab_size is not None and vocab != self.vocab_size:
            raise ProtocolError(f"{self.name}: vocabulary {vocab}, receiver expects {self.vocab_size}")
        return vocab


def _int(value: Any, label: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"{label} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def _list(value: Any, label: str, min_len: int, max_len: int) -> list:
    if type(value) is not list or not min_len <= len(value) <= max_len:
        raise ProtocolError(f"{label} must be an array of {min_len}..{max_len} items, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    size = f" of length {len(value)}" if isinstance(value, (bytes, str, list)) else ""
    return f"{type(value).__name__}{size}"


def _ids_to_wire(ids: Sequence[int] | torch.Tensor, label: str, vocab: int | None = None) -> bytes:
    arr = ids.detach().cpu().reshape(-1).numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if arr.size == 0:
        return b""
    if arr.dtype.kind not in "iu":
        raise ProtocolError(f"{label} must hold integer token ids, got dtype {arr.dtype}")
    bound = _UINT32_LIMIT if vocab is None else vocab
    if int(arr.min()) < 0 or int(arr.max()) >= bound:
        raise ProtocolError(f"{label}: token ids must lie in [0, {bound}), got "
                            f"[{int(arr.min())}, {int(arr.max())}]")
    return arr.astype("<u4").tobytes()


def _check_int(value: Any, label: str, lo: int = 0, hi: int = _INT64_MAX) -> int:
    """Encoder-side twin of :func:`_int` (accepts numpy/torch ints; bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ProtocolError(f"{label} must be an int, got {type(value).__name__}")
    return _int(int(value), label, lo, hi)


def _check_str(value: Any, label: str, limits: WireLimits) -> str:
    if type(value) is not str or len(value.encode("utf-8", "surrogatepass")) > limits.max_str_bytes:
        raise ProtocolError(f"{label} must be a str of at most {limits.max_str_bytes} bytes, got "
                            f"{_describe(value)}")
    return value


def _check_floats(values: Sequence[float], label: str) -> list[float]:
    out = [float(v) for v in values]
    if any(not math.isfinite(v) or v < 0 for v in out):
        raise ProtocolError(f"{label} must hold finite floats >= 0, got {out!r}")
    return out


# ----------------------------------------------------------------------------------- tensors


def tensor_to_wire(tensor: torch.Tensor) -> list:
    """``[dtype code, shape, buffer]`` of any tensor (non-contiguous ones are copied in row-major order).

    Raises:
        ProtocolError: the dtype has no wire code.
    """
    if tensor.dtype not in DTYPE_CODES:
        raise ProtocolError(f"dtype {tensor.dtype} cannot cross the wire; allowed: {list(DTYPE_CODES)}")
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    # Viewing as bytes lets numpy hand over bf16/uint32 buffers it has no dtype for.
    return [DTYPE_CODES[tensor.dtype], list(tensor.shape), flat.view(torch.uint8).numpy().tobytes()]


def tensor_from_wire(obj: Any, label: str = "tensor", limits: WireLimits = DEFAULT_LIMITS,
                     dtypes: Sequence[torch.dtype] | None = None) -> torch.Tensor:
    """Inverse of :func:`tensor_to_wire`; checks dtype, shape and buffer length against each other.

    Args:
        obj: the decoded ``[code, shape, buffer]``.
        label: names the field in error messages.
        limits: ``max_tensor_dims`` applies.
        dtypes: when given, the dtypes this field accepts.
    Returns:
        A tensor that owns its memory, of the sent dtype and shape.
    """
    code, shape, buf = _list(obj, label, 3, 3)
    if type(code) is not int or code not in _CODE_DTYPES:
        raise ProtocolError(f"{label}: unknown dtype code {code!r}")
    dtype = _CODE_DTYPES[code]
    if dtypes is not None and dtype not in dtypes:
        raise ProtocolError(f"{label}: dtype {dtype} not allowed here; allowed: {list(dtypes)}")
    shape = [_int(d, f"{label}.shape", 0, limits.max_decompressed_bytes) for d in
             _list(shape, f"{label}.shape", 0, limits.max_tensor_dims)]
    if type(buf) is not bytes:
        raise ProtocolError(f"{label}: buffer must be bytes, got {type(buf).__name__}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if math.prod(shape) * itemsize != len(buf):
        raise ProtocolError(f"{label}: shape {shape} of {dtype} needs {math.prod(shape) * itemsize} "
                            f"bytes, buffer has {len(buf)}")
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(buf), dtype=dtype).reshape(shape)


# ------------------------------------------------------------------ sparse distributions


def is_dense(dist: SparseDist) -> bool:
    """True when ``dist`` lists every token in order (the dense baseline of :func:`sparse.dense`)."""
    if dist.width != dist.vocab_size or dist.num_positions == 0:
        return False
    return bool((dist.indices == torch.arange(dist.vocab_size)).all())


def quantise_sparse(dist: SparseDist, config: CodecConfig = DEFAULT_CONFIG) -> SparseDist:
    """``dist`` exactly as a receiver will decode it: sample from this, then send it (or ``dist``).

    float16 rows are rounded and divided by their exact sum, trailing zero entries
    become padding (index 0, probability 0); a dense ``dist`` and float32 rows keep their values.
    Idempotent: ``quantise_sparse(quantise_sparse(d)) == quantise_sparse(d)`` bit for bit.

    Args:
        dist: ``n`` rows of probabilities over ``dist.vocab_size`` tokens.
        config: its ``prob_dtype`` and limits apply.
    Returns:
        A :class:`SparseDist` of the same shape, int64 indices, float32 probabilities.
    Raises:
        ProtocolError: ``dist`` is not a distribution the wire can carry.
    """
    if is_dense(dist):
        probs = _dense_probs(dist, config.limits)
        return _dense_from_probs(probs)
    wire = _sparse_to_wire(dist, config.prob_dtype, config.index_code, config.limits)
    return _sparse_from_wire(wire, "q", dist.num_positions, None, config.limits)


def _sparse_to_wire(dist: SparseDist, prob_dtype: torch.dtype, index_coding: int,
                    limits: WireLimits) -> list:
    """``[vocab, width, row_lengths, prob code, index code, indices, probs]`` of ``dist``.

    Only entries with a positive (wire) probability are sent, left-aligned in each row; with
    ``INDEX_DELTA_VARINT`` each row's entries are sorted by token id first.
    """
    if not 1 <= dist.vocab_size <= limits.max_vocab_size:
        raise ProtocolError(f"vocabulary {dist.vocab_size} outside [1, {limits.max_vocab_size}]")
    if dist.width > dist.vocab_size:
        raise ProtocolError(f"{dist.width} entries per row exceed the vocabulary of {dist.vocab_size}")
    _check_cells(dist.num_positions, dist.width, "q", limits)
    indices = dist.indices.detach().cpu().long()  # [n, k]
    probs = _checked_rows(dist.probs.detach().cpu().double(), "q", limits.prob_sum_tolerance)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= dist.vocab_size):
        raise ProtocolError(f"sparse indices must lie in [0, {dist.vocab_size})")
    if prob_dtype == torch.float16:
        wire = _round_fp16(probs / probs.sum(dim=1, keepdim=True))  # exact ratio, then rounded
    else:
        wire = probs.float()
    keep = wire > 0  # [n, k]; zero entries are padding whatever their index
    # Kept entries first (stable, so in their order), sorted by token id for delta coding.
    key = torch.where(keep, indices if index_coding == INDEX_DELTA_VARINT else 0, dist.vocab_size)
    order = torch.sort(key, dim=1, stable=True).indices
    indices, wire = indices.gather(1, order), wire.gather(1, order)
    lengths = keep.sum(dim=1)  # [n]
    keep = torch.arange(dist.width) < lengths.unsqueeze(1)
    flat = indices[keep].numpy()
    return [
        dist.vocab_size,
        dist.width,
        lengths.tolist(),
        DTYPE_CODES[prob_dtype],
        index_coding,
        _varint_deltas(flat, lengths.numpy()) if index_coding == INDEX_DELTA_VARINT
        else flat.astype("<u4").tobytes(),
        wire[keep].contiguous().view(torch.uint8).numpy().tobytes(),
    ]


def _sparse_from_wire(obj: Any, label: str, rows: int, vocab_size: int | None,
                      limits: WireLimits) -> SparseDist:
    """Inverse of :func:`_sparse_to_wire` for a distribution of ``rows`` rows; validates everything."""
    fields = _Reader(_list(obj, label, 7, 7), label, vocab_size, limits)
    vocab = fields.vocab()
    width = fields.integer("width", 0, vocab)
    lengths = fields.ints("row_lengths", 1, width)
    if len(lengths) != rows:
        raise ProtocolError(f"{label}: {len(lengths)} rows, expected {rows}")
    _check_cells(rows, width, label, limits)
    code = fields.integer("prob_dtype", 0, 255)
    if _CODE_DTYPES.get(code) not in PROB_DTYPES:
        raise ProtocolError(f"{label}: probability dtype code {code} is not one of {PROB_DTYPES}")
    dtype = _CODE_DTYPES[code]
    coding = fields.integer("index_coding", 0, 255)
    total = sum(lengths)
    if coding == INDEX_UINT32:
        flat_idx = fields.ids("indices", vocab, total)
    elif coding == INDEX_DELTA_VARINT:
        flat_idx = _from_varint_deltas(fields.raw("indices"), lengths, vocab, label)
    else:
        raise ProtocolError(f"{label}: unknown index coding {coding}")
    buf = fields.raw("probs")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if flat_idx.numel() != total or type(buf) is not bytes or len(buf) != total * itemsize:
        raise ProtocolError(f"{label}: row lengths {lengths} need {total} indices and "
                            f"{total * itemsize} probability bytes, got {flat_idx.numel()} and "
                            f"{_describe(buf)}")
    flat = torch.frombuffer(bytearray(buf), dtype=dtype) if total else torch.empty(0, dtype=dtype)
    keep = torch.arange(width) < torch.tensor(lengths, dtype=torch.int64).view(-1, 1)  # [rows, width]
    indices = torch.zeros(rows, width, dtype=torch.int64)
    indices[keep] = flat_idx
    wire = torch.zeros(rows, width, dtype=dtype)
    wire[keep] = flat
    if dtype == torch.float16:
        probs = _renormalise_fp16(wire, label)
    else:
        probs = _checked_rows(wire.double(), label, limits.prob_sum_tolerance).float()
    return SparseDist(indices, probs.contiguous(), vocab)


def _check_cells(rows: int, width: int, label: str, limits: WireLimits) -> None:
    if rows * width > limits.max_sparse_cells:
        raise ProtocolError(f"{label}: {rows} x {width} sparse cells exceed max_sparse_cells "
                            f"{limits.max_sparse_cells}")


def _varint_deltas(flat: np.ndarray, lengths: np.ndarray) -> bytes:
    """Token ids sorted within each row -> LEB128 varints of the gaps (each row starts from 0).

    Args:
        flat: ``[sum(lengths)]`` int64, ascending within each row.
        lengths: ``[n]`` entries per row.
    """
    if flat.size == 0:
        return b""
    starts = np.cumsum(lengths) - lengths  # [n]
    deltas = np.diff(flat, prepend=0)
    deltas[starts[lengths > 0]] = flat[starts[lengths > 0]]
    size = 1 + sum((deltas >= 1 << (_VARINT_BITS * j)).astype(np.int64) for j in range(1, _VARINT_MAX_BYTES))
    first = np.cumsum(size) - size  # byte offset of each value
    out = np.zeros(int(size.sum()), dtype=np.uint8)
    for j in range(_VARINT_MAX_BYTES):
        has = size > j
        more = np.where(size[has] > j + 1, _VARINT_MORE, 0)
        out[first[has] + j] = ((deltas[has] >> (_VARINT_BITS * j)) & _VARINT_MASK) | more
    return out.tobytes()


def _from_varint_deltas(buf: Any, lengths: list[int], vocab: int, label: str) -> torch.Tensor:
    """Inverse of :func:`_varint_deltas` -> ``[sum(lengths)]`` int64, each id checked below ``vocab``."""
    if type(buf) is not bytes:
        raise ProtocolError(f"{label}: varint indices must be bytes, got {type(buf).__name__}")
    total = sum(lengths)
    if not buf:
        if total:
            raise ProtocolError(f"{label}: no varint indices for {total} entries")
        return torch.zeros(0, dtype=torch.int64)
    data = np.frombuffer(buf, dtype=np.uint8)
    last = (data & _VARINT_MORE) == 0  # [bytes] the final byte of each value
    if not last[-1]:
        raise ProtocolError(f"{label}: varint indices end in the middle of a value")
    ends = np.flatnonzero(last)
    if ends.size != total:
        raise ProtocolError(f"{label}: {ends.size} varint indices for {total} entries")
    value_of = np.cumsum(last) - last  # [bytes] which value each byte belongs to
    starts = np.concatenate(([0], ends[:-1] + 1))
    place = np.arange(data.size) - starts[value_of]
    if int(place.max()) >= _VARINT_MAX_BYTES:
        raise ProtocolError(f"{label}: a varint index is longer than {_VARINT_MAX_BYTES} bytes")
    parts = (data & _VARINT_MASK).astype(np.int64) << (_VARINT_BITS * place)
    deltas = np.bincount(value_of, weights=parts, minlength=total).astype(np.int64)  # exact: < 2**28
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    running = np.cumsum(deltas)
    before_row = np.concatenate(([0], running))[np.cumsum(lengths) - np.asarray(lengths)]
    ids = running - before_row[row_of]
    if int(ids.max()) >= vocab:
        raise ProtocolError(f"{label}: token id {int(ids.max())} outside the vocabulary of {vocab}")
    return torch.from_numpy(ids)


def _dense_probs(dist: SparseDist, limits: WireLimits) -> torch.Tensor:
    probs = dist.probs.detach().cpu().float().contiguous()
    _checked_rows(probs.double(), "dense q", limits.prob_sum_tolerance)
    return probs


def _dense_from_probs(probs: torch.Tensor) -> SparseDist:
    rows, vocab = probs.shape
    indices = torch.arange(vocab, dtype=torch.int64).expand(rows, vocab).contiguous()
    return SparseDist(indices, probs, vocab)


def _checked_rows(probs: torch.Tensor, label: str, tolerance: float) -> torch.Tensor:
    """Rejects rows that are not distributions: ``[n, k]`` float64 -> itself, negative zeros cleared."""
    if not bool(torch.isfinite(probs).all()):
        raise ProtocolError(f"{label}: probabilities must be finite (found NaN or inf)")
    if bool((probs < 0).any()):
        raise ProtocolError(f"{label}: probabilities must be >= 0, found {float(probs.min())}")
    sums = probs.sum(dim=1)
    bad = (sums - 1).abs() > tolerance
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ProtocolError(f"{label}: row {row} sums to {float(sums[row])!r}, not 1 within {tolerance}")
    return probs.clamp_min(0.0)  # -0.0 -> 0.0 keeps fp16 bit patterns canonical


def _renormalise_fp16(h16: torch.Tensor, label: str) -> torch.Tensor:
    """Receiver side: fp16 rows ``[n, k]`` -> float32 rows divided by their exact sum."""
    values = h16.double()
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ProtocolError(f"{label}: float16 probabilities must be finite and >= 0")
    sums = values.sum(dim=1, keepdim=True)  # exact: fp16 values are multiples of 2**-24
    bad = ((sums - 1).abs() > FP16_SUM_TOLERANCE).view(-1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ProtocolError(f"{label}: row {row} sums to {float(sums[row])!r}, not 1 within the "
                            f"float16 tolerance {FP16_SUM_TOLERANCE}")
    return (values / sums).float()


def _round_fp16(probs: torch.Tensor) -> torch.Tensor:
    """Sender side: rows ``[n, k]`` float64 summing to 1 -> fp16 rows the receiver accepts.

    Round to nearest can leave a row up to 2**-11 off, above :data:`FP16_SUM_TOLERANCE`; such a row
    is repaired by :func:`_fix_row`.
    """
    h16 = probs.to(torch.float16)
    off = (h16.double().sum(dim=1) - 1).abs() > FP16_SUM_TOLERANCE  # [n]
    for row in off.nonzero().view(-1).tolist():
        h16[row] = _fix_row(h16[row].clone())
    return h16


def _fix_row(h16: torch.Tensor) -> torch.Tensor:
    """Moves entries of one fp16 row ``[k]`` (in place) until it sums to 1 within the tolerance.

    Each jump gives one positive entry the whole missing mass (rounded to fp16), choosing, among the
    entries that would land the row within tolerance, the one changed least relative to its value
    (else the one that lands closest). Zeros stay zero and positives stay positive, so the support of
    the distribution is kept; the sender samples from the result, so this costs no exactness.
    """
    for _ in range(_FIXUP_MAX_JUMPS):
        value = h16.double()
        missing = 1.0 - float(value.sum())
        if abs(missing) <= FP16_SUM_TOLERANCE:
            return h16
        moved = (value + missing).clamp_min(_FP16_SMALLEST).to(torch.float16)  # [k]
        change = moved.double() - value
        landing = (missing - change).abs()
        relative = change.abs() / value.clamp_min(_FP16_SMALLEST)
        never = torch.full_like(value, math.inf)
        landing = torch.where(value > 0, landing, never)
        lands = landing <= FP16_SUM_TOLERANCE
        j = int(torch.where(lands, relative, never).argmin()) if bool(lands.any()) else int(landing.argmin())
        h16[j] = moved[j]
    raise ProtocolError(f"cannot round a row summing to {float(h16.double().sum())!r} to float16 "
                        f"within {FP16_SUM_TOLERANCE} of 1")


# ---------------------------------------------------------------------------------- messages


def _encode_open(msg: OpenSession, config: CodecConfig) -> list:
    p = msg.params
    limits = config.limits
    return [int(Tag.OPEN_SESSION), _check_str(msg.session_id, "session_id", limits), [
        float(p.temperature), _check_int(p.top_k, "top_k"), float(p.top_p),
        _check_int(p.seed, "seed", -(1 << 63), (1 << 64) - 1),
        _check_str(p.acceptance, "acceptance", limits), _check_str(p.sparsifier, "sparsifier", limits),
        _check_int(p.sparse_k, "sparse_k"), float(p.sparse_mass)]]


def _decode_open(r: _Reader) -> OpenSession:
    session_id = r.text("session_id")
    p = _Reader(_list(r.raw("params"), "OPEN_SESSION.params", 8, 8), "SamplingParams", None, r.limits)
    params = SamplingParams(
        temperature=_unit(p.real("temperature"), "temperature", 0.0, math.inf),
        top_k=p.integer("top_k"),
        top_p=_unit(p.real("top_p"), "top_p", 0.0, 1.0),
        seed=p.integer("seed", -(1 << 63), (1 << 64) - 1),
        acceptance=p.text("acceptance"),
        sparsifier=p.text("sparsifier"),
        sparse_k=p.integer("sparse_k"),
        sparse_mass=_unit(p.real("sparse_mass"), "sparse_mass", 0.0, 1.0),
    )
    r.done()
    return OpenSession(session_id, params)


def _unit(value: float, label: str, lo: float, hi: float) -> float:
    """``value`` in ``(lo, hi]`` (temperature: ``[0, inf)``)."""
    ok = lo <= value < hi if hi == math.inf else lo < value <= hi
    if not ok:
        raise ProtocolError(f"SamplingParams.{label} = {value} out of range")
    return value


def _encode_proposal(msg: DraftProposal, config: CodecConfig) -> list:
    limits, q = config.limits, msg.q
    if msg.candidates.dim() != 1:
        raise ProtocolError(f"candidates must be [g], got shape {tuple(msg.candidates.shape)}")
    g = msg.num_candidates
    if g > limits.max_list_len or q.num_positions != g:
        raise ProtocolError(f"{g} candidates (max {limits.max_list_len}) with {q.num_positions} q rows")
    if len(msg.context) > limits.max_tokens:
        raise ProtocolError(f"context of {len(msg.context)} tokens exceeds max_tokens {limits.max_tokens}")
    _check_parents(msg.parents, g)
    candidates = msg.candidates.detach().cpu().long()
    head = [_check_str(msg.session_id, "session_id", limits), _check_int(msg.round, "round"),
            _check_int(msg.rollback, "rollback"), _ids_to_wire(msg.context, "context", q.vocab_size),
            _ids_to_wire(candidates, "candidates", q.vocab_size),
            [_check_int(p, "parents", -1) for p in msg.parents],
            [_check_int(i, "prev_path") for i in msg.prev_path]]
    if is_dense(q):
        probs = _dense_probs(q, limits)
        _check_drawable(_dense_prob_of(probs, candidates), candidates)
        return [int(Tag.PROPOSAL_DENSE), *head, q.vocab_size, probs.view(torch.uint8).numpy().tobytes()]
    sparse = _sparse_to_wire(q, config.prob_dtype, config.index_code, limits)
    received = _sparse_from_wire(sparse, "PROPOSAL.q", g, None, limits)
    _check_drawable(received.prob_of(candidates), candidates)
    return [int(Tag.PROPOSAL), *head, sparse]


def _check_parents(parents: Sequence[int], g: int) -> None:
    if parents and len(parents) != g:
        raise ProtocolError(f"{len(parents)} tree parents for {g} candidates (want 0 or {g})")
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:  # parents come first: no cycles, and -1 is the last context token
            raise ProtocolError(f"parents[{i}] = {parent} must be in [-1, {i})")


def _dense_prob_of(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``probs[i, candidates[i]]``: ``[g, V]``, ``[g]`` -> ``[g]``."""
    return probs.gather(1, candidates.view(-1, 1)).view(-1)


def _check_drawable(q_of_candidates: torch.Tensor, candidates: torch.Tensor) -> None:
    # verify_exact accepts x when u * q(x) < p(x): a candidate the sender could not have drawn
    # (q = 0) would be accepted whenever p(x) > 0, silently breaking losslessness.
    drawable = q_of_candidates > 0  # [g]
    if not bool(drawable.all()):
        i = int((~drawable).nonzero()[0])
        raise ProtocolError(f"candidate {i} (token {int(candidates[i])}) has q = 0 in the q sent: "
                            "sample candidates from quantise_sparse(q)")


def _decode_proposal_body(fields: Any, vocab_size: int | None, limits: WireLimits) -> DraftProposal:
    fields = _list(fields, "proposal", 1, limits.max_list_len)
    tag = fields[0]
    if type(tag) is not int or tag not in (Tag.PROPOSAL, Tag.PROPOSAL_DENSE):
        raise ProtocolError(f"expected a proposal tag, got {tag!r}")
    r = _Reader(fields, Tag(tag).name, vocab_size, limits, start=1)
    session_id, round_, rollback = r.text("session_id"), r.integer("round"), r.integer("rollback")
    # Ids are checked against the message's vocabulary once it is known (it comes last).
    context, candidates = r.ids("context", 1 << 32, limits.max_tokens), \
        r.ids("candidates", 1 << 32, limits.max_list_len)
    g = candidates.numel()
    parents = r.ints("parents", -1, _INT64_MAX)
    _check_parents(parents, g)
    prev_path = r.ints("prev_path", 0, _INT64_MAX)
    if tag == Tag.PROPOSAL:
        q = _sparse_from_wire(r.raw("q"), "PROPOSAL.q", g, vocab_size, limits)
    else:
        vocab = r.vocab()
        buf = r.raw("q")
        if type(buf) is not bytes or len(buf) != g * vocab * 4:
            raise ProtocolError(f"PROPOSAL_DENSE: q of {g} x {vocab} float32 needs {g * vocab * 4} "
                                f"bytes, got {_describe(buf)}")
        probs = torch.frombuffer(bytearray(buf), dtype=torch.float32).reshape(g, vocab) if buf \
            else torch.zeros(0, vocab)
        _checked_rows(probs.double(), "PROPOSAL_DENSE.q", limits.prob_sum_tolerance)
        q = _dense_from_probs(probs)
    r.done()
    for label, ids in (("context", context), ("candidates", candidates)):
        if ids.numel() and int(ids.max()) >= q.vocab_size:
            raise ProtocolError(f"{r.name}.{label}: token id {int(ids.max())} outside the vocabulary "
                                f"of {q.vocab_size}")
    _check_drawable(_dense_prob_of(q.probs, candidates) if tag == Tag.PROPOSAL_DENSE
                    else q.prob_of(candidates), candidates)
    return DraftProposal(session_id, round_, rollback, context.tolist(), candidates, q, parents, prev_path)


def _decode_proposal(r: _Reader) -> DraftProposal:
    return _decode_proposal_body(r.fields, r.vocab_size, r.limits)


def _encode_stage(msg: StageFrame, config: CodecConfig) -> list:
    hidden = msg.hidden
    fed = len(msg.proposal.context) + msg.proposal.num_candidates
    if hidden.dtype not in HIDDEN_DTYPES or hidden.dim() != 2 or hidden.shape[0] != fed:
        raise ProtocolError(f"hidden must be [{fed}, hidden_size] of {HIDDEN_DTYPES}, got "
                            f"{tuple(hidden.shape)} {hidden.dtype}")
    if bool(torch.isnan(hidden).any()):
        raise ProtocolError("hidden states contain NaN")
    return [int(Tag.STAGE_FRAME), _encode_proposal(msg.proposal, config), tensor_to_wire(hidden),
            _check_floats(msg.stage_ms, "stage_ms")]


def _decode_stage(r: _Reader) -> StageFrame:
    proposal = _decode_proposal_body(r.raw("proposal"), r.vocab_size, r.limits)
    hidden = tensor_from_wire(r.raw("hidden"), "STAGE_FRAME.hidden", r.limits, HIDDEN_DTYPES)
    fed = len(proposal.context) + proposal.num_candidates
    if hidden.dim() != 2 or hidden.shape[0] != fed:
        raise ProtocolError(f"STAGE_FRAME.hidden must be [{fed}, hidden_size] (context + candidates), "
                            f"got {tuple(hidden.shape)}")
    if bool(torch.isnan(hidden).any()):  # +-inf may be real activations; NaN never is
        raise ProtocolError("STAGE_FRAME.hidden contains NaN")
    stage_ms = r.floats("stage_ms")
    r.done()
    return StageFrame(proposal, hidden, stage_ms)


def _encode_verify(msg: VerifyResult, config: CodecConfig) -> list:
    if len(msg.tokens) != msg.accepted + 1:
        raise ProtocolError(f"{len(msg.tokens)} tokens for {msg.accepted} accepted (want accepted + 1)")
    return [int(Tag.VERIFY_RESULT), _check_str(msg.session_id, "session_id", config.limits),
            _check_int(msg.round, "round"),
            _check_int(msg.accepted, "accepted"), _ids_to_wire(msg.tokens, "tokens"),
            [bool(b) for b in msg.accepted_mask], [_check_int(i, "path") for i in msg.path],
            _check_floats(msg.stage_ms, "stage_ms")]


def _decode_verify(r: _Reader) -> VerifyResult:
    session_id, round_ = r.text("session_id"), r.integer("round")
    accepted = r.integer("accepted", 0, r.limits.max_list_len)
    tokens = r.ids("tokens", None, r.limits.max_list_len + 1).tolist()
    if len(tokens) != accepted + 1:
        raise ProtocolError(f"VERIFY_RESULT: {len(tokens)} tokens for {accepted} accepted "
                            "(want accepted + 1)")
    result = VerifyResult(session_id, round_, accepted, tokens, r.bools("accepted_mask"),
                          r.ints("path", 0, _INT64_MAX), r.floats("stage_ms"))
    r.done()
    return result


def _encode_split(msg: SplitPayload, config: CodecConfig) -> list:
    if msg.p.num_positions != 1:
        raise ProtocolError(f"SplitPayload.p must have 1 row, got {msg.p.num_positions}")
    return [int(Tag.SPLIT_PAYLOAD), _check_str(msg.session_id, "session_id", config.limits),
            _check_int(msg.round, "round"),
            _check_int(msg.accepted, "accepted"),
            # The device samples the correction from this p: quantising it would make output lossy.
            _sparse_to_wire(msg.p, torch.float32, config.index_code, config.limits)]


def _decode_split(r: _Reader) -> SplitPayload:
    msg = SplitPayload(r.text("session_id"), r.integer("round"), r.integer("accepted"),
                       _sparse_from_wire(r.raw("p"), "SPLIT_PAYLOAD.p", 1, r.vocab_size, r.limits))
    r.done()
    return msg


def _encode_commit(msg: Commit, config: CodecConfig) -> list:
    return [int(Tag.COMMIT), _check_str(msg.session_id, "session_id", config.limits),
            _check_int(msg.round, "round"), _check_int(msg.keep, "keep")]


def _decode_commit(r: _Reader) -> Commit:
    msg = Commit(r.text("session_id"), r.integer("round"), r.integer("keep"))
    r.done()
    return msg


def _encode_error(msg: ErrorMessage, config: CodecConfig) -> list:
    # round is signed here: an error about an undecodable frame may not know its round.
    limits = config.limits
    return [int(Tag.ERROR), _check_str(msg.session_id, "session_id", limits),
            _check_int(msg.round, "round", -(1 << 63)), _check_str(msg.code, "code", limits),
            _check_str(msg.text, "text", limits)]


def _decode_error(r: _Reader) -> ErrorMessage:
    msg = ErrorMessage(r.text("session_id"), r.integer("round", -(1 << 63)), r.text("code"), r.text("text"))
    r.done()
    return msg


_ENCODERS: dict[type, Callable[[Any, CodecConfig], list]] = {
    OpenSession: _encode_open,
    DraftProposal: _encode_proposal,
    StageFrame: _encode_stage,
    VerifyResult: _encode_verify,
    SplitPayload: _encode_split,
    Commit: _encode_commit,
    ErrorMessage: _encode_error,
}
_DECODERS: dict[int, Callable[[_Reader], Message]] = {
    Tag.OPEN_SESSION: _decode_open,
    Tag.PROPOSAL: _decode_proposal,
    Tag.PROPOSAL_DENSE: _decode_proposal,
    Tag.STAGE_FRAME: _decode_stage,
    Tag.VERIFY_RESULT: _decode_verify,
    Tag.SPLIT_PAYLOAD: _decode_split,
    Tag.COMMIT: _decode_commit,
    Tag.ERROR: _decode_error,
}
