"""A draft's q on the wire: sparse rows (fp16 or fp32 probabilities, uint32 or delta-varint ids) and
the dense float32 baseline.

Sparse: ``[vocab_size, width, row_lengths, prob dtype code, index coding, indices, probs]``. Only the
entries of positive probability are sent (``row_lengths`` of them per row), sorted by token id, and
re-padded to ``width`` with (index 0, probability 0) on receipt. Ids are uint32, or (default) the
gaps between them as LEB128 varints: ~2 bytes instead of 4 for a top-16 row of a 151,936-token
vocabulary. float16 rows are divided by their exact row sum on receipt (see
:func:`specmesh.runtime.sparse.quantise_fp16`, which gives the same q); float32 rows travel unchanged.

The decoder works on the entries that were sent and allocates the padded ``[rows, width]`` result
only once every check has passed (12 bytes a cell, bounded by ``max_sparse_cells``).
"""
from __future__ import annotations

import numpy as np
import torch

from . import sparse
from .encodings import CODE_DTYPES, DTYPE_CODES, from_varint_deltas, ids_from_wire, varint_deltas
from .framing import ProtocolError, WireLimits
from .sparse import SparseDist

PROB_DTYPES = (torch.float16, torch.float32)
INDEX_UINT32 = 0
INDEX_DELTA_VARINT = 1
INDEX_CODINGS = {"uint32": INDEX_UINT32, "delta-varint": INDEX_DELTA_VARINT}


def sparse_to_wire(dist: SparseDist, prob_dtype: torch.dtype, index_coding: int, limits: WireLimits,
                   sparse_q: type) -> object:
    """The schema's ``SparseQ`` Struct of ``dist`` (rows quantised to ``prob_dtype``)."""
    if not 1 <= dist.vocab_size <= limits.max_vocab_size:
        raise ProtocolError(f"q: vocabulary {dist.vocab_size} outside [1, {limits.max_vocab_size}]")
    if dist.width > dist.vocab_size:
        raise ProtocolError(f"q: {dist.width} entries per row exceed the vocabulary of {dist.vocab_size}")
    check_cells(dist.num_positions, dist.width, "q", limits)
    indices = dist.indices.detach().cpu().long()  # [n, k]
    probs = _rows(dist.probs.detach().cpu().double(), limits.prob_sum_tolerance)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= dist.vocab_size):
        raise ProtocolError(f"q: sparse indices must lie in [0, {dist.vocab_size})")
    if prob_dtype == torch.float16:
        wire = sparse.round_fp16(probs / probs.sum(dim=1, keepdim=True))  # exact ratio, then rounded
    else:
        wire = probs.float()
    indices, wire = sparse.positive_first(indices, wire, dist.vocab_size)
    lengths = (wire > 0).sum(dim=1)  # [n]
    keep = torch.arange(dist.width) < lengths.unsqueeze(1)  # [n, k]
    flat = indices[keep].numpy()
    ids = (varint_deltas(flat, lengths.numpy()) if index_coding == INDEX_DELTA_VARINT
           else flat.astype("<u4").tobytes())
    return sparse_q(dist.vocab_size, dist.width, lengths.tolist(), DTYPE_CODES[prob_dtype], index_coding,
                    memoryview(ids), memoryview(wire[keep].contiguous().view(torch.uint8).numpy().tobytes()))


def sparse_from_wire(q: object, label: str, rows: int, vocab_size: int | None,
                     limits: WireLimits) -> SparseDist:
    """Inverse of :func:`sparse_to_wire` for a q of ``rows`` rows; checks every rule of the format.

    Args:
        q: the decoded ``SparseQ`` Struct.
        label: names the field in errors.
        rows: the rows the message needs (its candidates).
        vocab_size: the receiver's vocabulary, when it has one.
    """
    vocab = q.vocab_size
    if vocab_size is not None and vocab != vocab_size:
        raise ProtocolError(f"{label}.vocab_size: vocabulary {vocab}, receiver expects {vocab_size}")
    if q.width > vocab:
        raise ProtocolError(f"{label}.width: {q.width} entries per row exceed the vocabulary of {vocab}")
    if len(q.row_lengths) != rows:
        raise ProtocolError(f"{label}.row_lengths: {len(q.row_lengths)} rows, expected {rows}")
    lengths = np.asarray(q.row_lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > q.width:
        raise ProtocolError(f"{label}.row_lengths: a row of {int(lengths.max())} entries exceeds the "
                            f"width {q.width}")
    check_cells(rows, q.width, label, limits)
    dtype = CODE_DTYPES.get(q.prob_dtype)
    if dtype not in PROB_DTYPES:
        raise ProtocolError(f"{label}.prob_dtype: code {q.prob_dtype} is not one of {PROB_DTYPES}")
    total = int(lengths.sum())
    if q.index_coding == INDEX_UINT32:
        if len(q.indices) != 4 * total:
            raise ProtocolError(f"{label}.indices: {len(q.indices)} bytes for {total} uint32 ids")
        flat_idx = ids_from_wire(q.indices, f"{label}.indices", vocab)
    elif q.index_coding == INDEX_DELTA_VARINT:
        flat_idx = from_varint_deltas(q.indices, lengths, vocab, f"{label}.indices")
    else:
        raise ProtocolError(f"{label}.index_coding: unknown index coding {q.index_coding}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(q.probs) != total * itemsize:
        raise ProtocolError(f"{label}.probs: row lengths {q.row_lengths} need {total * itemsize} "
                            f"bytes, got {len(q.probs)}")
    flat = torch.frombuffer(bytearray(q.probs), dtype=dtype) if total else torch.empty(0, dtype=dtype)
    row_of = torch.from_numpy(np.repeat(np.arange(rows), lengths))  # [total]
    values = flat.double()
    if not bool(torch.isfinite(values).all()):
        raise ProtocolError(f"{label}.probs: probabilities must be finite (found NaN or inf)")
    if bool((values < 0).any()):
        raise ProtocolError(f"{label}.probs: probabilities must be >= 0, found {float(values.min())}")
    sums = torch.zeros(rows, dtype=torch.float64).index_add_(0, row_of, values)  # exact for fp16
    tolerance = sparse.FP16_SUM_TOLERANCE if dtype == torch.float16 else limits.prob_sum_tolerance
    bad = (sums - 1).abs() > tolerance
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ProtocolError(f"{label}.probs: row {row} sums to {float(sums[row])!r}, not 1 within {tolerance}")
    if dtype == torch.float16:
        probs = sparse.renormalise_fp16(flat, sums[row_of])
    else:
        probs = flat.clamp_min(0.0)  # -0.0 -> 0.0
    col = torch.arange(total) - torch.from_numpy(np.repeat(np.cumsum(lengths) - lengths, lengths))
    at = row_of * q.width + col  # [total] cell of each entry
    indices = torch.zeros(rows * q.width, dtype=torch.int64)
    indices[at] = flat_idx
    padded = torch.zeros(rows * q.width, dtype=torch.float32)
    padded[at] = probs
    return SparseDist(indices.view(rows, q.width), padded.view(rows, q.width), vocab)


def dense_to_wire(dist: SparseDist, limits: WireLimits) -> bytes:
    """The float32 buffer ``[g, vocab]`` of a dense q (:func:`sparse.is_dense`)."""
    if dist.vocab_size > limits.max_vocab_size:
        raise ProtocolError(f"q: vocabulary {dist.vocab_size} above max_vocab_size {limits.max_vocab_size}")
    check_dense_cells(dist.num_positions, dist.vocab_size, "q", limits)
    probs = dist.probs.detach().cpu().float().contiguous()
    _rows(probs.double(), limits.prob_sum_tolerance)
    return probs.view(torch.uint8).numpy().tobytes()


def dense_from_wire(buf: memoryview, label: str, rows: int, vocab: int, limits: WireLimits) -> SparseDist:
    """Inverse of :func:`dense_to_wire`: ``rows`` float32 rows over ``vocab`` tokens, checked.

    ``max_dense_cells`` bounds ``buf`` in the schema, before this runs.
    """
    if len(buf) != rows * vocab * 4:
        raise ProtocolError(f"{label}: q of {rows} x {vocab} float32 needs {rows * vocab * 4} bytes, "
                            f"got {len(buf)}")
    probs = torch.frombuffer(bytearray(buf), dtype=torch.float32).reshape(rows, vocab) if rows \
        else torch.zeros(0, vocab)
    if not bool(torch.isfinite(probs).all()):
        raise ProtocolError(f"{label}: probabilities must be finite (found NaN or inf)")
    if bool((probs < 0).any()):
        raise ProtocolError(f"{label}: probabilities must be >= 0, found {float(probs.min())}")
    sums = probs.sum(dim=1, dtype=torch.float64)
    bad = (sums - 1).abs() > limits.prob_sum_tolerance
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ProtocolError(f"{label}: row {row} sums to {float(sums[row])!r}, not 1 within "
                            f"{limits.prob_sum_tolerance}")
    # Every row lists every token in order: a view, not a [rows, vocab] int64 copy.
    return SparseDist(torch.arange(vocab).expand(rows, vocab), probs, vocab)


def check_cells(rows: int, width: int, label: str, limits: WireLimits) -> None:
    if rows * width > limits.max_sparse_cells:
        raise ProtocolError(f"{label}: {rows} x {width} sparse cells exceed max_sparse_cells "
                            f"{limits.max_sparse_cells}")


def check_dense_cells(rows: int, vocab: int, label: str, limits: WireLimits) -> None:
    if rows * vocab > limits.max_dense_cells:
        raise ProtocolError(f"{label}: {rows} x {vocab} dense cells exceed max_dense_cells "
                            f"{limits.max_dense_cells}")


def _rows(probs: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Sender side: ``sparse.check_rows`` with its ValueError as the ProtocolError of the wire."""
    try:
        return sparse.check_rows(probs, "q", tolerance)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
