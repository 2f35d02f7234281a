"""Frames: the 2-byte header, zstd, and the size limits a decoder enforces before it allocates.

Frame (all multi-byte numbers little-endian)::

    byte 0     PROTOCOL_VERSION
    byte 1     flags: bit 0 set = the body is one zstd frame (with its content size); other bits 0
    bytes 2..  body: a msgpack array ``[tag, field, field, ...]`` (see :mod:`specmesh.runtime.schema`)

A compressed body is inflated only after its declared size has passed three bounds: the global
``max_decompressed_bytes``, the most that its message type can hold (the tag is read from the first
bytes of the stream), and ``max(inflate_floor_bytes, inflate_ratio * frame size)``, so that a few
kilobytes on the wire never turn into hundreds of megabytes in memory.

This module is a leaf: it imports nothing of SpecMesh but :mod:`specmesh.runtime.sparse`.
"""
from __future__ import annotations

import io
import struct
import threading
from dataclasses import dataclass
from typing import Callable

import zstandard

from .sparse import ROW_SUM_TOLERANCE

PROTOCOL_VERSION = 2
FLAG_ZSTD = 0x01
HEADER = struct.Struct("<BB")  # version, flags
_KNOWN_FLAGS = FLAG_ZSTD
_MIB = 1 << 20
# Bytes of a body that hold its array header (at most 5: array32) and its tag (1: a positive fixint).
_HEAD_BYTES = 6
_FIXARRAY, _FIXARRAY_LAST, _ARRAY16, _ARRAY32, _FIXINT_LAST = 0x90, 0x9F, 0xDC, 0xDD, 0x7F


class ProtocolError(ValueError):
    """A frame or message violates the wire protocol; the message names the field that was wrong."""


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
    # rows x vocabulary of a dense q (4 bytes a cell): 16 MiB, 27 rows of Qwen's 151,936 tokens.
    max_dense_cells: int = 1 << 22
    # A compressed body may inflate to max(inflate_floor_bytes, inflate_ratio * frame bytes). Real
    # bodies (bf16 activations, fp16 probabilities, token ids) compress 1-3x; 16x leaves room for
    # repetitive prompts while a 4 KB frame can never demand more than the floor.
    inflate_ratio: int = 16
    inflate_floor_bytes: int = 16 * _MIB
    # float32 rows must sum to 1 within this (see sparse.ROW_SUM_TOLERANCE).
    prob_sum_tolerance: float = ROW_SUM_TOLERANCE

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_decompressed_bytes", "max_str_bytes", "max_list_len",
                     "max_tokens", "max_vocab_size", "max_tensor_dims", "max_sparse_cells",
                     "max_dense_cells", "inflate_ratio", "inflate_floor_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"WireLimits.{name} must be an int >= 1, got {value!r}")
        if self.max_vocab_size > 1 << 24:
            raise ValueError(f"max_vocab_size must be <= 2**24, got {self.max_vocab_size}")
        if not 0.0 < self.prob_sum_tolerance < 1.0:
            raise ValueError(f"prob_sum_tolerance must be in (0, 1), got {self.prob_sum_tolerance}")


DEFAULT_LIMITS = WireLimits()

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


def pack_frame(body: bytes, compress_threshold: int | None, compress_level: int,
               limits: WireLimits) -> bytes:
    """Header + body, the body zstd-compressed when it is at least ``compress_threshold`` bytes and
    compression makes it smaller.

    Raises:
        ProtocolError: the body or the frame exceeds ``limits``.
    """
    if len(body) > limits.max_decompressed_bytes:
        raise ProtocolError(f"body of {len(body)} bytes exceeds max_decompressed_bytes "
                            f"{limits.max_decompressed_bytes}")
    flags = 0
    if compress_threshold is not None and len(body) >= compress_threshold:
        packed = _compressor(compress_level).compress(body)
        if len(packed) < len(body):  # incompressible bodies go raw
            body, flags = packed, FLAG_ZSTD
    frame = HEADER.pack(PROTOCOL_VERSION, flags) + body
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds max_frame_bytes {limits.max_frame_bytes}")
    return frame


def open_frame(data: bytes | bytearray | memoryview, limits: WireLimits,
               body_limit: Callable[[int], tuple[str, int]]) -> tuple[int, bytes | memoryview]:
    """Checks the header and sizes of one frame and returns ``(tag, body)``.

    Args:
        data: the frame.
        limits: the bounds to enforce.
        body_limit: a tag's message name and the most bytes its body can legitimately hold; it
            raises :class:`ProtocolError` for an unknown tag.
    Returns:
        The message tag and the (inflated) msgpack body, not yet parsed.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"frame must be bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    if len(view) > limits.max_frame_bytes:
        raise ProtocolError(f"frame of {len(view)} bytes exceeds max_frame_bytes {limits.max_frame_bytes}")
    if len(view) < HEADER.size:
        raise ProtocolError(f"frame of {len(view)} bytes is shorter than the {HEADER.size}-byte header")
    version, flags = HEADER.unpack_from(view)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, this codec speaks {PROTOCOL_VERSION}")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x}")
    body = view[HEADER.size:]
    if not flags & FLAG_ZSTD:
        tag = read_tag(body)
        _check_body_size(len(body), tag, limits, body_limit)
        return tag, body
    size = _declared_size(body)
    inflate_bound = max(limits.inflate_floor_bytes, limits.inflate_ratio * len(view))
    if size > inflate_bound:
        raise ProtocolError(f"zstd frame of {len(view)} bytes declares {size} bytes, above the inflate "
                            f"bound {inflate_bound} (inflate_ratio {limits.inflate_ratio})")
    if size > limits.max_decompressed_bytes:
        raise ProtocolError(f"zstd frame declares {size} bytes, above max_decompressed_bytes "
                            f"{limits.max_decompressed_bytes}")
    tag = read_tag(_head(body))
    _check_body_size(size, tag, limits, body_limit)
    try:
        out = _decompressor().decompress(body, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"corrupt zstd body: {exc}") from None
    if len(out) != size:
        raise ProtocolError(f"zstd body gave {len(out)} bytes, header declared {size}")
    return tag, out


def _check_body_size(size: int, tag: int, limits: WireLimits,
                     body_limit: Callable[[int], tuple[str, int]]) -> None:
    if size > limits.max_decompressed_bytes:
        raise ProtocolError(f"body of {size} bytes exceeds max_decompressed_bytes "
                            f"{limits.max_decompressed_bytes}")
    name, bound = body_limit(tag)
    if size > bound:
        raise ProtocolError(f"{name}: body of {size} bytes exceeds the {bound} its fields can hold")


def _declared_size(body: memoryview) -> int:
    try:
        size = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"bad zstd frame header: {exc}") from None
    if size < 0:  # unknown size: refusing it is what bounds the allocation
        raise ProtocolError("zstd frame does not declare its content size")
    return size


def _head(body: memoryview) -> bytes:
    """The first bytes of a zstd body's content, inflated on their own (no more than a block)."""
    try:
        with _decompressor().stream_reader(io.BytesIO(body)) as reader:
            return reader.read(_HEAD_BYTES)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"corrupt zstd body: {exc}") from None


def read_tag(body: bytes | memoryview) -> int:
    """The tag of a body ``[tag, ...]``: the first element after the array header.

    Raises:
        ProtocolError: the body is not an array, or its first element is not a small positive int
            (every tag is one; its encoding is a positive fixint).
    """
    if len(body) < 1 or not (_FIXARRAY <= body[0] <= _FIXARRAY_LAST or body[0] in (_ARRAY16, _ARRAY32)):
        raise ProtocolError("malformed body: not a msgpack array [tag, fields...]")
    at = 1 if body[0] <= _FIXARRAY_LAST else 3 if body[0] == _ARRAY16 else 5
    if body[0] == _FIXARRAY or len(body) <= at:
        raise ProtocolError("malformed body: no message tag")
    if body[at] > _FIXINT_LAST:
        raise ProtocolError(f"unknown message tag (msgpack byte 0x{body[at]:02x}, not a small int)")
    return body[at]
