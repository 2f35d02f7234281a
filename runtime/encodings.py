"""Tensors and token ids as wire buffers: ``[dtype code, shape, buffer]``, uint32 ids, varint gaps.

Buffers are the host's memory in row-major order; the wire is little-endian, so this codec runs on
little-endian hosts only. Every decoder here checks sizes before it allocates.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Sequence

import numpy as np
import torch

from .framing import DEFAULT_LIMITS, ProtocolError, WireLimits
from .schema import decode_as, encode_struct, schema

if sys.byteorder != "little":  # buffers are the host's memory; the wire is little-endian
    raise ImportError("specmesh.runtime.encodings supports little-endian hosts only")

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
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
HIDDEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # hidden states travel in these
UINT32_LIMIT = 1 << 32
# LEB128 varints: 7 value bits per byte, the high bit says another byte follows.
_VARINT_BITS = 7
_VARINT_MASK = (1 << _VARINT_BITS) - 1
_VARINT_MORE = 1 << _VARINT_BITS
VARINT_MAX_BYTES = 4  # 28 bits hold any id below max_vocab_size = 2**24
_NAN_CHUNK = 1 << 20  # elements checked for NaN at a time: bounds the temporary mask to 1 MiB


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
        obj: the decoded ``[code, shape, buffer]``, or the schema's ``Tensor`` Struct.
        label: names the field in error messages.
        limits: ``max_tensor_dims`` applies.
        dtypes: when given, the dtypes this field accepts.
    Returns:
        A tensor that owns its memory, of the sent dtype and shape.
    """
    kind = schema(limits).tensor
    if not isinstance(obj, kind):
        try:
            obj = decode_as(kind, encode_struct(obj), label, limits)
        except TypeError as exc:  # not even msgpack-shaped
            raise ProtocolError(f"{label}: {exc}") from None
    dtype = CODE_DTYPES.get(obj.dtype)
    if dtype is None:
        raise ProtocolError(f"{label}.dtype: unknown dtype code {obj.dtype}")
    if dtypes is not None and dtype not in dtypes:
        raise ProtocolError(f"{label}.dtype: {dtype} not allowed here; allowed: {list(dtypes)}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if math.prod(obj.shape) * itemsize != len(obj.buffer):
        raise ProtocolError(f"{label}.shape: {obj.shape} of {dtype} needs {math.prod(obj.shape) * itemsize} "
                            f"bytes, buffer has {len(obj.buffer)}")
    if not len(obj.buffer):
        return torch.empty(obj.shape, dtype=dtype)
    return torch.frombuffer(bytearray(obj.buffer), dtype=dtype).reshape(obj.shape)


def has_nan(tensor: torch.Tensor) -> bool:
    """Whether a float tensor holds a NaN, checked in chunks (no mask the size of the tensor)."""
    flat = tensor.reshape(-1)
    return any(bool(torch.isnan(flat[i:i + _NAN_CHUNK]).any()) for i in range(0, flat.numel(), _NAN_CHUNK))


# --------------------------------------------------------------------------------- token ids


def ids_to_wire(ids: Sequence[int] | torch.Tensor, label: str, vocab: int | None = None) -> bytes:
    """Token ids -> a uint32 buffer, each id checked in ``[0, vocab)`` (or below 2**32)."""
    arr = ids.detach().cpu().reshape(-1).numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if arr.size == 0:
        return b""
    if arr.dtype.kind not in "iu":
        raise ProtocolError(f"{label} must hold integer token ids, got dtype {arr.dtype}")
    bound = UINT32_LIMIT if vocab is None else vocab
    if int(arr.min()) < 0 or int(arr.max()) >= bound:
        raise ProtocolError(f"{label}: token ids must lie in [0, {bound}), got "
                            f"[{int(arr.min())}, {int(arr.max())}]")
    return arr.astype("<u4").tobytes()


def ids_from_wire(buf: memoryview | bytes, label: str, vocab: int | None) -> torch.Tensor:
    """A uint32 buffer -> ``[n]`` int64, each id below ``vocab`` when given."""
    if len(buf) % 4:
        raise ProtocolError(f"{label} must be a uint32 buffer, got {len(buf)} bytes")
    ids = torch.from_numpy(np.frombuffer(buf, dtype="<u4").astype(np.int64))
    check_vocab(ids, label, vocab)
    return ids


def check_vocab(ids: torch.Tensor, label: str, vocab: int | None) -> None:
    """Raises when an id of ``ids`` ``[n]`` is not below ``vocab`` (None: no bound)."""
    if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
        raise ProtocolError(f"{label}: token id {int(ids.max())} outside the vocabulary of {vocab}")


def varint_deltas(flat: np.ndarray, lengths: np.ndarray) -> bytes:
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
    size = 1 + sum((deltas >= 1 << (_VARINT_BITS * j)).astype(np.int64) for j in range(1, VARINT_MAX_BYTES))
    first = np.cumsum(size) - size  # byte offset of each value
    out = np.zeros(int(size.sum()), dtype=np.uint8)
    for j in range(VARINT_MAX_BYTES):
        has = size > j
        more = np.where(size[has] > j + 1, _VARINT_MORE, 0)
        out[first[has] + j] = ((deltas[has] >> (_VARINT_BITS * j)) & _VARINT_MASK) | more
    return out.tobytes()


def from_varint_deltas(buf: memoryview | bytes, lengths: np.ndarray, vocab: int, label: str) -> torch.Tensor:
    """Inverse of :func:`varint_deltas` -> ``[sum(lengths)]`` int64, each id checked below ``vocab``.

    The buffer is bounded by the declared count (at most ``VARINT_MAX_BYTES`` per id) before any
    array is built, so a long run of continuation bytes costs nothing.
    """
    total = int(lengths.sum())
    if len(buf) > VARINT_MAX_BYTES * total:
        raise ProtocolError(f"{label}: {len(buf)} varint bytes cannot hold {total} ids "
                            f"({VARINT_MAX_BYTES} bytes each at most)")
    if not total:
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
    if int(place.max()) >= VARINT_MAX_BYTES:
        raise ProtocolError(f"{label}: a varint index is longer than {VARINT_MAX_BYTES} bytes")
    parts = (data & _VARINT_MASK).astype(np.int64) << (_VARINT_BITS * place)
    deltas = np.bincount(value_of, weights=parts, minlength=total).astype(np.int64)  # exact: < 2**28
    running = np.cumsum(deltas)
    row_start = np.cumsum(lengths) - lengths  # [rows] index of each row's first id
    before_row = np.concatenate(([0], running))[row_start]
    ids = running - np.repeat(before_row, lengths)
    if int(ids.max()) >= vocab:
        raise ProtocolError(f"{label}: token id {int(ids.max())} outside the vocabulary of {vocab}")
    return torch.from_numpy(ids)
