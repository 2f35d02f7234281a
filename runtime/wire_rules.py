"""The rules that relate a message's fields to each other, applied on encode and on decode; and a
proposal's q kept in its wire form until it is read.

Every rule that concerns one field alone (its type, range, length) lives in the schema
(:mod:`specmesh.runtime.schema`); the format rules of tensors and q live in :mod:`encodings` and
:mod:`sparse_wire`. What is left is here: tree parents, q against the candidates, hidden states
against the tokens fed, tokens against the accepted count.
"""
from __future__ import annotations

from typing import Any, Callable

import msgspec
import torch

from .encodings import HIDDEN_DTYPES, check_vocab, has_nan
from .framing import ProtocolError
from .messages import Deferred, DraftProposal, ErrorMessage, OpenSession, StageFrame, VerifyResult, deferred
from .schema import decode_as, schema
from .sparse import SparseDist
from .sparse_wire import dense_from_wire, sparse_from_wire
from .split_wire import split_proposal_rules, split_verdict_rules
from .federated_wire import federated_rules
from .messages import FederatedRows


class WireQ(Deferred):
    """A proposal's q as it came off the wire; :meth:`resolve` decodes and checks it once."""

    def __init__(self, wire: Any, ctx: Any) -> None:
        self.raw: msgspec.Raw = wire.q
        self.dense = type(wire).__name__ == "DenseProposal"
        self.vocab: int | None = wire.vocab_size if self.dense else None
        self.ctx = ctx
        self._value: SparseDist | None = None
        self._ids: tuple[torch.Tensor, torch.Tensor] | None = None  # candidates [g], max context id [1]

    def resolve(self) -> SparseDist:
        if self._value is None:
            ctx, (candidates, context) = self.ctx, self._ids
            s, label, g = schema(ctx.limits), ctx.at("q"), int(candidates.numel())
            if self.dense:
                if ctx.vocab_size is not None and self.vocab != ctx.vocab_size:
                    raise ProtocolError(f"{ctx.at('vocab_size')}: vocabulary {self.vocab}, receiver "
                                        f"expects {ctx.vocab_size}")
                buf = decode_as(s.dense_q, self.raw, label, ctx.limits)
                q = dense_from_wire(buf, label, g, self.vocab, ctx.limits)
            else:
                q = sparse_from_wire(decode_as(s.sparse_q, self.raw, label, ctx.limits), label, g,
                                     ctx.vocab_size, ctx.limits)
            check_vocab(context, ctx.at("context"), q.vocab_size)
            check_vocab(candidates, ctx.at("candidates"), q.vocab_size)
            check_drawable(dense_prob_of(q.probs, candidates) if self.dense else q.prob_of(candidates),
                            candidates, label)
            self._value = q
        return self._value


# ---------------------------------------------------------------------------------- rules


def _proposal_rules(p: DraftProposal, ctx: Any, encoding: bool) -> None:
    if not isinstance(p.candidates, torch.Tensor) or p.candidates.dim() != 1:
        raise ProtocolError(f"{ctx.at('candidates')} must be a [g] tensor, got {type(p.candidates).__name__}")
    g = p.num_candidates
    if p.parents and len(p.parents) != g:
        raise ProtocolError(f"{ctx.at('parents')}: {len(p.parents)} tree parents for {g} candidates "
                            f"(want 0 or {g})")
    for i, parent in enumerate(p.parents):
        if not -1 <= parent < i:  # parents come first: no cycles, and -1 is the last context token
            raise ProtocolError(f"{ctx.at('parents')}[{i}] = {parent} must be in [-1, {i})")
    pending = deferred(p, "q")
    if p.q_x is not None:  # split verification: scalar draft probabilities instead of q rows
        split_proposal_rules(p, ctx)
    elif isinstance(pending, WireQ):
        pending._ids = (p.candidates, torch.tensor([max(p.context, default=0)], dtype=torch.int64))
    elif encoding and p.q.num_positions != g:
        raise ProtocolError(f"{ctx.at('q')}: {p.q.num_positions} rows for {g} candidates")


def _stage_rules(frame: StageFrame, ctx: Any, encoding: bool) -> None:
    hidden, fed = frame.hidden, len(frame.proposal.context) + frame.proposal.num_candidates
    if hidden.dtype not in HIDDEN_DTYPES or hidden.dim() != 2 or hidden.shape[0] != fed:
        raise ProtocolError(f"{ctx.at('hidden')} must be [{fed}, hidden_size] (context + candidates) of "
                            f"{HIDDEN_DTYPES}, got {tuple(hidden.shape)} {hidden.dtype}")
    if has_nan(hidden):  # +-inf may be real activations; NaN never is
        raise ProtocolError(f"{ctx.at('hidden')} contains NaN")


def _verify_rules(v: VerifyResult, ctx: Any, encoding: bool) -> None:
    if v.correction_p is not None:  # split verification: the device draws the correction
        split_verdict_rules(v, ctx)
    elif len(v.tokens) != v.accepted + 1:
        raise ProtocolError(f"{ctx.at('tokens')}: {len(v.tokens)} tokens for {v.accepted} accepted "
                            "(want accepted + 1)")


def _no_rules(msg: Any, ctx: Any, encoding: bool) -> None:
    """Every rule of this message is a field's own, checked by the schema."""


# The rules that relate a message's fields to each other, applied on encode and on decode.
RULES: dict[type, Callable[..., None]] = {
    OpenSession: _no_rules, DraftProposal: _proposal_rules, StageFrame: _stage_rules,
    VerifyResult: _verify_rules, ErrorMessage: _no_rules, FederatedRows: federated_rules,
}


def dense_prob_of(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``probs[i, candidates[i]]``: ``[g, V]``, ``[g]`` -> ``[g]``."""
    return probs.gather(1, candidates.view(-1, 1)).view(-1)


def check_drawable(q_of_candidates: torch.Tensor, candidates: torch.Tensor, label: str) -> None:
    # verify_exact accepts x when u * q(x) < p(x): a candidate the sender could not have drawn
    # (q = 0) would be accepted whenever p(x) > 0, silently breaking losslessness.
    drawable = q_of_candidates > 0  # [g]
    if not bool(drawable.all()):
        i = int((~drawable).nonzero()[0])
        raise ProtocolError(f"{label}: candidate {i} (token {int(candidates[i])}) has q = 0 in the q "
                            "sent: sample candidates from sparse.quantise_fp16(q)")
