"""The messages that cross links between SpecMesh workers, as plain frozen dataclasses.

Bytes on the wire are the business of :mod:`specmesh.runtime.codec` alone; this module only says what
a message holds. Every message carries the session id and the round number so that a stale or
misrouted message is recognised: a worker raises on a round it has already seen, never applies it.

Positions: a session's committed tokens are numbered 0, 1, 2, ...; a worker's KV cache holds the
first ``n`` of them (plus, transiently, candidates). ``rollback`` tells a worker to keep only the first
``rollback`` cached positions before doing anything else (Petals-style position setter).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from .sparse import SparseDist

PolicyValue = str | int | float | bool


class Deferred(ABC):
    """A field value still in its wire form, decoded (and validated) when first read.

    The codec puts one in a :class:`DraftProposal` that it decodes inside a :class:`StageFrame`: a
    middle stage never reads ``q`` and passes its bytes on unchanged; the last stage's ``proposal.q``
    decodes it then, with every check of the wire format.
    """

    @abstractmethod
    def resolve(self) -> Any:
        """The decoded value (computed once; raises what decoding raises)."""


class _DeferredField:
    """Data descriptor of a dataclass field that may hold a :class:`Deferred` until it is read."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}_value"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:  # class access: the field has no default
            raise AttributeError(self.slot)
        value = obj.__dict__[self.slot]
        return value.resolve() if isinstance(value, Deferred) else value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value  # dataclass __init__ only: the class is frozen


def deferred(obj: Any, name: str) -> Deferred | None:
    """The :class:`Deferred` behind field ``name`` of ``obj``, if it came off the wire that way."""
    value = obj.__dict__.get(f"_{name}_value")
    return value if isinstance(value, Deferred) else None


@dataclass(frozen=True)
class SamplingParams:
    """Per-session sampling parameters that workers need (sent once, when a session opens).

    Attributes:
        temperature: 0 = greedy.
        top_k: user top-k warper on p and q (0 = off).
        top_p: user top-p warper on p and q (1.0 = off).
        seed: root of every random draw of the session.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class OpenSession:
    """Tells a worker to create the state of a session.

    Attributes:
        session_id: names the session in every later message.
        params: sampling parameters.
        policy: the named policy map (``acceptance``, ``sparsifier`` and every knob of the
            policies, e.g. ``sparse_k``): workers build their policy objects from it through the
            policies' registries, so a new knob is not a wire-format change.
    """

    session_id: str
    params: SamplingParams
    policy: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DraftProposal:
    """Device -> stage 0: what the target must verify this round (the uplink message).

    Attributes:
        session_id, round: identify the round; a worker raises on a round it has already seen.
        rollback: target stages keep only this many cached positions first.
        context: committed tokens the target has not cached yet, at positions ``rollback...``; the
            correction/bonus token of the previous round, or the whole prompt in round 1.
        candidates: drafted token ids ``[g]`` int64, at positions ``base...`` (chain) or at
            ``base + depth`` (tree); ``base = rollback + len(context)``.
        parents: tree parent of each candidate (index into ``candidates``, -1 = the last context
            token); empty for a chain.
        q: row ``i`` is the sparse distribution candidate ``i`` was drawn from, given its earlier
            siblings (``g`` rows). Inside a decoded :class:`StageFrame` it stays in its wire form
            until first read (see :class:`Deferred`).
        prev_path: for trees, the candidate indices of the previous round that were accepted, so
            stages can compact their KV cache to that path; empty for chains.
        draft_ms: the draft's compute time for this proposal (the round's time breakdown).
        q_x: split verification (DSSD) only: ``[g]`` float32, ``q_i(x_i)`` of each candidate under
            the row it was drawn from, sent *instead of* the rows (``q`` is then empty, 0 rows, and
            only names the vocabulary); None in target-side verification.
    """

    session_id: str
    round: int
    rollback: int
    context: list[int]
    candidates: torch.Tensor  # [g] int64
    q: SparseDist = _DeferredField()  # g rows (0 rows when q_x is set)
    parents: list[int] = field(default_factory=list)
    prev_path: list[int] = field(default_factory=list)
    draft_ms: float = 0.0
    q_x: torch.Tensor | None = None  # [g] float32, split verification only

    @property
    def split(self) -> bool:
        """True when the proposal carries scalar draft probabilities instead of q rows."""
        return self.q_x is not None

    @property
    def base(self) -> int:
        return self.rollback + len(self.context)

    @property
    def num_candidates(self) -> int:
        return int(self.candidates.numel())


@dataclass(frozen=True)
class StageFrame:
    """Stage k -> stage k+1: hidden states of all fed tokens plus the proposal they belong to.

    Attributes:
        proposal: passed through unchanged (the last stage needs its q and candidates; the stages
            before it pass q on as the bytes that came in).
        hidden: ``[len(context) + g, hidden_size]``, on the wire in the model dtype (float16,
            bfloat16 or float32), bit for bit.
        stage_ms: compute time of each stage so far, for the round's time breakdown.
    """

    proposal: DraftProposal
    hidden: torch.Tensor  # [n_fed, hidden]
    stage_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class VerifyResult:
    """Last stage -> device: the verdict of one round (the downlink message).

    Attributes:
        accepted: draft tokens accepted.
        tokens: tokens to commit: the accepted path plus one correction/bonus token.
        accepted_mask: per candidate, whether it is on the accepted path (for a chain: per drafted
            position).
        path: for trees, the accepted candidate indices; empty for chains.
        stage_ms: compute time of each stage this round.
        draft_ms: the draft's compute time for the round's proposal (copied from it).
        correction_p: split verification (DSSD) only, after a rejection at ``j = accepted``: the
            support of ``p_j`` (one row, float32, every token with ``p_j > 0``); ``tokens`` then
            holds the accepted tokens only and the device draws the correction from
            ``norm(max(p_j - q_j, 0))`` (:attr:`pending`). None otherwise.
    """

    session_id: str
    round: int
    accepted: int
    tokens: list[int]
    accepted_mask: list[bool] = field(default_factory=list)
    path: list[int] = field(default_factory=list)
    stage_ms: list[float] = field(default_factory=list)
    draft_ms: float = 0.0
    correction_p: SparseDist | None = None  # 1 row, split verification only

    @property
    def pending(self) -> bool:
        """True when the correction token is still to be drawn by the device (split verification)."""
        return self.correction_p is not None


@dataclass(frozen=True)
class ErrorMessage:
    """A worker's answer to a message it could not process; it keeps serving."""

    session_id: str
    round: int
    code: str
    text: str


@dataclass(frozen=True)
class ProposeRequest:
    """Scheduler -> draft worker (both on the device): sync to the committed tokens, then draft.

    Attributes:
        session_id, round: the round to draft.
        start: position of ``tokens[0]``; the draft has been told every committed token before it.
        tokens: committed tokens from ``start`` on (the new ones since the last round).
        gamma: depth to draft (0 = none: the proposal only carries the target's context).
        target_rollback: cached positions the target keeps; the proposal's context is
            ``committed[target_rollback:]``.
        width: candidates per depth (1 = a chain; more = a token tree whose first sibling at each
            depth is extended, the others are leaves).
        prev_path: the previous round's accepted candidate indices (for tree KV compaction).
        stop_below: draft-side confidence stop (chains): stop after a depth whose draft top
            probability is below this (None: draft all ``gamma``).
    """

    session_id: str
    round: int
    start: int
    tokens: list[int]
    gamma: int
    target_rollback: int
    width: int = 1
    prev_path: list[int] = field(default_factory=list)
    stop_below: float | None = None


@dataclass(frozen=True)
class FederatedRows:
    """A federated worker's last stage -> the aggregator on the device (SpecFed): its top-K of p.

    Attributes:
        session_id, round: the round verified.
        rows: ``g + 1`` rows (the p after the last context token and after each candidate, as a
            verifier orders them), the worker's top-K entries renormalised.
        kept: ``[g + 1]`` float32, the worker's p mass on the entries sent (``1 - kept`` is missing).
        stage_ms: compute time of each of the worker's stages this round.
    """

    session_id: str
    round: int
    rows: SparseDist  # g + 1 rows
    kept: torch.Tensor  # [g + 1] float32
    stage_ms: list[float] = field(default_factory=list)
