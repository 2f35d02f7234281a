"""The wire of split verification (DSSD): scalar draft probabilities up, one p row down.

- ``PROPOSAL_SPLIT`` carries, instead of q rows, ``q_x``: a float32 buffer ``[g]``, the probability
  of each candidate under the row the draft sampled it from. float32 because those values are fp16
  values divided by an exact row sum (``sparse.quantise_fp16``), not fp16 values: an fp16 scalar
  would differ from the q the draft sampled from, and the ratio test must use that very q.
- ``VERIFY_SPLIT`` carries, after a rejection at ``j``, ``correction_p``: one sparse row in the
  ``SparseQ`` layout of :mod:`sparse_wire`, float32 only (fp16 would change p, and the device's
  residual must use the p of the edge's ratio test, bit for bit), listing every token with
  ``p_j > 0``; ``tokens`` then hold the accepted tokens only.

Rules checked here, on encode and decode: ``q_x`` finite, in (0, 1], one per candidate, the
proposal a chain; ``correction_p`` one float32 row, tokens = accepted, a rejection happened
(accepted < drafted), no tree path.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .encodings import DTYPE_CODES, check_vocab
from .framing import ProtocolError
from .messages import DraftProposal, VerifyResult
from .schema import Tag, schema
from .sparse import SparseDist
from .sparse_wire import INDEX_CODINGS, sparse_from_wire, sparse_to_wire

_F32 = DTYPE_CODES[torch.float32]


def split_tag(msg: Any) -> Tag | None:
    """The split message shape of ``msg``, or None when it has the target-side one."""
    if isinstance(msg, DraftProposal) and msg.q_x is not None:
        return Tag.PROPOSAL_SPLIT
    if isinstance(msg, VerifyResult) and msg.correction_p is not None:
        return Tag.VERIFY_SPLIT
    return None


def is_split_wire(wire: Any) -> bool:
    return type(wire).__name__ in ("SplitProposal", "SplitVerifyResult")


# ------------------------------------------------------------------------- uplink: q_x


def q_x_to_wire(msg: DraftProposal, ctx: Any) -> bytes:
    check_q_x(msg.q_x, msg.num_candidates, ctx.at("q_x"))
    return msg.q_x.detach().cpu().contiguous().numpy().astype("<f4").tobytes()


def q_x_from_wire(wire: Any, ctx: Any) -> torch.Tensor | None:
    """``[g]`` float32 of a split proposal; None for the other proposal shapes."""
    if type(wire).__name__ != "SplitProposal":
        return None
    if len(wire.q_x) % 4:
        raise ProtocolError(f"{ctx.at('q_x')} must be a float32 buffer, got {len(wire.q_x)} bytes")
    return torch.from_numpy(np.frombuffer(wire.q_x, dtype="<f4").copy())


def q_from_split(wire: Any, ctx: Any) -> SparseDist:
    """A split proposal's ``q``: no rows, only the vocabulary (checked against the receiver's)."""
    if ctx.vocab_size is not None and wire.vocab_size != ctx.vocab_size:
        raise ProtocolError(f"{ctx.at('vocab_size')}: vocabulary {wire.vocab_size}, receiver expects "
                            f"{ctx.vocab_size}")
    return SparseDist.empty(wire.vocab_size)


def check_q_x(q_x: Any, g: int, label: str) -> None:
    """Raises unless ``q_x`` is ``[g]`` float32, every value finite and in (0, 1]."""
    if not isinstance(q_x, torch.Tensor) or q_x.dtype != torch.float32 or q_x.dim() != 1:
        raise ProtocolError(f"{label} must be a [g] float32 tensor, got "
                            f"{getattr(q_x, 'dtype', type(q_x).__name__)} {tuple(getattr(q_x, 'shape', ()))}")
    if q_x.numel() != g:
        raise ProtocolError(f"{label}: {q_x.numel()} draft probabilities for {g} candidates (want one each)")
    if not bool(torch.isfinite(q_x).all()):
        raise ProtocolError(f"{label}: draft probabilities must be finite (found NaN or inf)")
    bad = (q_x <= 0) | (q_x > 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ProtocolError(f"{label}[{i}] = {float(q_x[i])!r}: a drawn candidate's probability must be in (0, 1]")


def split_proposal_rules(p: DraftProposal, ctx: Any) -> None:
    """Rules of a proposal carrying ``q_x`` (both directions)."""
    check_q_x(p.q_x, p.num_candidates, ctx.at("q_x"))
    if p.parents:
        raise ProtocolError(f"{ctx.at('parents')}: split verification verifies chains only (a tree's "
                            "recursive rejection needs every sibling's q row at the edge)")
    q = p.q
    if q.num_positions:
        raise ProtocolError(f"{ctx.at('q')}: a split proposal carries q_x, not {q.num_positions} q rows")
    check_vocab(p.candidates, ctx.at("candidates"), q.vocab_size)
    check_vocab(torch.tensor([max(p.context, default=0)]), ctx.at("context"), q.vocab_size)


# ------------------------------------------------------------------ downlink: correction_p


def correction_to_wire(msg: VerifyResult, ctx: Any) -> Any:
    index_coding = INDEX_CODINGS[ctx.config.index_coding]
    return sparse_to_wire(msg.correction_p, torch.float32, index_coding, ctx.limits, schema(ctx.limits).sparse_q)


def correction_from_wire(wire: Any, ctx: Any) -> SparseDist | None:
    """The one float32 row of a split verdict; None for a target-side verdict."""
    if type(wire).__name__ != "SplitVerifyResult":
        return None
    label = ctx.at("correction_p")
    if wire.correction_p.prob_dtype != _F32:
        raise ProtocolError(f"{label}.prob_dtype: code {wire.correction_p.prob_dtype}; p travels in "
                            "float32 only (the device's residual must use the edge's p bit for bit)")
    return sparse_from_wire(wire.correction_p, label, 1, ctx.vocab_size, ctx.limits)


def split_verdict_rules(v: VerifyResult, ctx: Any) -> None:
    """Rules of a verdict whose correction is pending (both directions)."""
    p = v.correction_p
    if not isinstance(p, SparseDist) or p.num_positions != 1:
        raise ProtocolError(f"{ctx.at('correction_p')} must be one sparse row, got "
                            f"{getattr(p, 'num_positions', type(p).__name__)}")
    if len(v.tokens) != v.accepted:
        raise ProtocolError(f"{ctx.at('tokens')}: {len(v.tokens)} tokens for {v.accepted} accepted "
                            "(a pending correction: want accepted)")
    if v.accepted >= len(v.accepted_mask):
        raise ProtocolError(f"{ctx.at('accepted')}: {v.accepted} of {len(v.accepted_mask)} drafted: "
                            "a correction is pending only after a rejection")
    if v.path:
        raise ProtocolError(f"{ctx.at('path')}: split verification verifies chains only")
    check_vocab(torch.tensor(v.tokens or [0]), ctx.at("tokens"), p.vocab_size)
