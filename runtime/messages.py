"""The messages that cross links between SpecMesh workers, as plain frozen dataclasses.

Bytes on the wire are the business of :mod:`specmesh.runtime.codec` alone; this module only says what
a message holds. Every message carries the session id and the round number so that a stale or
misrouted reply is recognised and dropped, never applied.

Positions: a session's committed tokens are numbered 0, 1, 2, ...; a worker's KV cache holds the
first ``n`` of them (plus, transiently, candidates). ``rollback`` tells a worker to keep only the first
``rollback`` cached positions before doing anything else (Petals-style position setter).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sparse import SparseDist


@dataclass(frozen=True)
class SamplingParams:
    """Per-session parameters that workers need (sent once, when a session opens).

    Attributes:
        temperature: 0 = greedy.
        top_k: user top-k warper on p and q (0 = off).
        top_p: user top-p warper on p and q (1.0 = off).
        seed: root of every random draw of the session.
        acceptance: name of the acceptance policy (see ``specmesh.policies.acceptance``).
        sparsifier: name of the draft-side sparsifier (see ``specmesh.policies.sparsify``).
        sparse_k: entries kept per position by ``top-k`` (and the cap for ``top-p``).
        sparse_mass: probability mass kept per position by ``top-p``.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    acceptance: str = "exact"
    sparsifier: str = "top-k"
    sparse_k: int = 16
    sparse_mass: float = 0.95


@dataclass(frozen=True)
class OpenSession:
    """Tells a worker to create the state of a session."""

    session_id: str
    params: SamplingParams


@dataclass(frozen=True)
class DraftProposal:
    """Device -> stage 0: what the target must verify this round (the uplink message).

    Attributes:
        session_id, round: identify the round; a reply for an older round is dropped.
        rollback: target stages keep only this many cached positions first.
        context: committed tokens the target has not cached yet, at positions ``rollback...``; the
            correction/bonus token of the previous round, or the whole prompt in round 1.
        candidates: drafted token ids ``[g]`` int64, at positions ``base...`` (chain) or at
            ``base + depth`` (tree); ``base = rollback + len(context)``.
        parents: tree parent of each candidate (index into ``candidates``, -1 = the last context
            token); empty for a chain.
        q: row ``i`` is the sparse distribution candidate ``i`` was drawn from, given its earlier
            siblings (``g`` rows).
        prev_path: for trees, the candidate indices of the previous round that were accepted, so
            stages can compact their KV cache to that path; empty for chains.
    """

    session_id: str
    round: int
    rollback: int
    context: list[int]
    candidates: torch.Tensor  # [g] int64
    q: SparseDist  # g rows
    parents: list[int] = field(default_factory=list)
    prev_path: list[int] = field(default_factory=list)

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
        proposal: passed through unchanged (the last stage needs its q and candidates).
        hidden: ``[len(context) + g, hidden_size]`` in the model dtype (bf16 on the wire).
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
    """

    session_id: str
    round: int
    accepted: int
    tokens: list[int]
    accepted_mask: list[bool] = field(default_factory=list)
    path: list[int] = field(default_factory=list)
    stage_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class SplitPayload:
    """DSSD split verification, edge -> device: the target's p at the first rejected position.

    The device holds q there and samples the correction from ``norm(max(p - q, 0))`` itself.
    """

    session_id: str
    round: int
    accepted: int
    p: SparseDist  # 1 row


@dataclass(frozen=True)
class Commit:
    """Tells a worker which prefix of its cache is committed (rollback without a new round)."""

    session_id: str
    round: int
    keep: int


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
    """

    session_id: str
    round: int
    start: int
    tokens: list[int]
    gamma: int
    target_rollback: int
    width: int = 1
    prev_path: list[int] = field(default_factory=list)
