"""A federated worker's reply on the wire (SpecFed, tag 11 ``FEDERATED_ROWS``).

``[tag, session_id, round, rows, kept, stage_ms]``: ``rows`` is the worker's top-K of p per position
renormalised, in the sparse q format of :mod:`sparse_wire` with float32 probabilities (so the dense
setting, K = V, carries p exactly); ``kept`` is a float32 buffer ``[n]``, the mass p put on the sent
entries of each row (the aggregator's missing mass is ``1 - kept``). The codec maps the fields through
the converters here; :func:`federated_rules` relates them.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .framing import ProtocolError
from .schema import schema
from .sparse_wire import INDEX_CODINGS, sparse_from_wire, sparse_to_wire

# A kept mass summed in float32 may pass 1 by rounding; beyond this it is not a mass.
KEPT_TOLERANCE = 1e-4


def rows_to_wire(msg: Any, ctx: Any) -> Any:
    return sparse_to_wire(msg.rows, torch.float32, INDEX_CODINGS[ctx.config.index_coding], ctx.limits,
                          schema(ctx.limits).sparse_q)


def rows_from_wire(wire: Any, ctx: Any) -> Any:
    return sparse_from_wire(wire.rows, ctx.at("rows"), len(wire.kept) // 4, ctx.vocab_size, ctx.limits)


def kept_to_wire(msg: Any, ctx: Any) -> memoryview:
    return memoryview(np.asarray(msg.kept.detach().cpu().float().numpy(), dtype="<f4").tobytes())


def kept_from_wire(wire: Any, ctx: Any) -> torch.Tensor:
    if len(wire.kept) % 4:
        raise ProtocolError(f"{ctx.at('kept')}: {len(wire.kept)} bytes is not a float32 buffer")
    return torch.frombuffer(bytearray(wire.kept), dtype=torch.float32) if len(wire.kept) \
        else torch.zeros(0, dtype=torch.float32)


def federated_rules(msg: Any, ctx: Any, encoding: bool) -> None:
    """One kept mass per row, each a finite number in (0, 1]."""
    kept = msg.kept
    if not isinstance(kept, torch.Tensor) or kept.dim() != 1:
        raise ProtocolError(f"{ctx.at('kept')} must be a [n] tensor, got {type(kept).__name__}")
    if kept.numel() != msg.rows.num_positions:
        raise ProtocolError(f"{ctx.at('kept')}: {kept.numel()} masses for {msg.rows.num_positions} rows")
    k = kept.double()
    if not bool(torch.isfinite(k).all()) or bool((k <= 0).any()) or bool((k > 1 + KEPT_TOLERANCE).any()):
        raise ProtocolError(f"{ctx.at('kept')}: masses must lie in (0, 1], got {kept.tolist()[:8]}")
