"""SpecFed's aggregator (device side): every worker's top-K reply in, one verdict out.

Each federated worker verifies the same candidates and answers a :class:`FederatedRows` (its top-K of
p per position). The aggregator rebuilds each worker's p with the session's strategy
(:mod:`specmesh.policies.federated`), averages them with the worker weights and runs exact speculative
sampling of the draft's candidates against that average with the verifiers of
:mod:`specmesh.runtime.verify` and :mod:`specmesh.runtime.tree` (chains and trees; greedy at
temperature 0, where each worker's p is one-hot and the average is a weighted vote). With K = V (the
dense setting) the committed tokens follow the exact weighted average; otherwise they follow the
reconstructed average, within the bounds :class:`AggregateRound` records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from specmesh.policies import federated as fed

from . import sampling
from .messages import DraftProposal, FederatedRows, OpenSession, SamplingParams, VerifyResult
from .sparse import SparseDist
from .tree import ROOT, TokenTree, verify_tree_exact, verify_tree_greedy
from .verify import Verdict, verify_exact, verify_greedy


def worker_reply(proposal: DraftProposal, p: torch.Tensor, stage_ms: list[float], top_k: int) -> FederatedRows:
    """A worker's reply to a round: its top-``top_k`` of ``p`` (``[g + 1, V]``) per position."""
    rows, kept = fed.truncate(p, top_k)
    return FederatedRows(proposal.session_id, proposal.round, rows, kept, list(stage_ms))


def prior_rows(proposal: DraftProposal) -> torch.Tensor:
    """The draft's q at each verified position, for ``spread-q``: ``[g + 1, V]`` float32.

    p row 0 follows the last context token, row ``1 + i`` candidate ``i``; the q there is the row of
    the first child drawn at that node (drawn from the node's full q). A node without a child (the
    bonus position of a chain) gets a zero row: its missing mass is spread uniformly.
    """
    g = proposal.num_candidates
    parents = proposal.parents or list(range(-1, g - 1))
    q = proposal.q.to_dense() if g else torch.zeros(0, proposal.q.vocab_size)  # [g, V]
    out = torch.zeros(g + 1, proposal.q.vocab_size)
    for node in range(ROOT, g):
        children = [i for i, parent in enumerate(parents) if parent == node]
        if children:
            out[node + 1] = q[children[0]]
    return out


@dataclass(frozen=True)
class AggregateRound:
    """What one aggregation did, per verified position (``g + 1`` rows): for measurements.

    Attributes:
        rebuilt: per worker, its reconstructed p ``[g + 1, V]`` float64.
        bounds: per worker, the bound on ``TV(rebuilt, true p)`` ``[g + 1]``.
        average: the reconstructed weighted average ``[g + 1, V]`` float64 (what was verified against).
        bound: the aggregation (and acceptance-rate) bias bound ``[g + 1]``.
    """

    rebuilt: list[torch.Tensor]
    bounds: list[torch.Tensor]
    average: torch.Tensor
    bound: torch.Tensor


class Aggregator:
    """Averages the workers' replies and verifies the draft against the average.

    Args:
        settings: worker weights, top-K and strategy.
        vocab_size: the vocabulary every worker shares.
    """

    def __init__(self, settings: fed.FederatedSettings, vocab_size: int) -> None:
        self.settings = settings
        self.vocab_size = vocab_size
        self._params: dict[str, SamplingParams] = {}

    def open(self, msg: OpenSession) -> None:
        acceptance = msg.policy.get("acceptance", "exact")
        if acceptance != "exact":
            raise ValueError(f"federated verification is exact only; acceptance {acceptance!r} is not supported")
        self._params[msg.session_id] = msg.params

    def close(self, session_id: str) -> None:
        self._params.pop(session_id, None)

    def aggregate(self, proposal: DraftProposal, replies: Sequence[FederatedRows]) -> AggregateRound:
        """Checks the replies against the round, rebuilds each worker's p and averages them."""
        s, g = self.settings, proposal.num_candidates
        if len(replies) != s.num_workers:
            raise ValueError(f"{len(replies)} replies for {s.num_workers} federated workers")
        prior = prior_rows(proposal) if s.strategy == fed.SPREAD_Q else None
        rebuilt, bounds = [], []
        for m, reply in enumerate(replies):
            if (reply.session_id, reply.round) != (proposal.session_id, proposal.round):
                raise ValueError(f"worker {m} answered session {reply.session_id} round {reply.round}; "
                                 f"expected {proposal.session_id} round {proposal.round}")
            if reply.rows.num_positions != g + 1 or reply.rows.vocab_size != self.vocab_size:
                raise ValueError(f"worker {m} sent {reply.rows.num_positions} rows over {reply.rows.vocab_size} "
                                 f"tokens; expected {g + 1} over {self.vocab_size}")
            rebuilt.append(fed.reconstruct(reply.rows, reply.kept, s.strategy, prior))
            bounds.append(fed.reconstruction_bound(reply.rows, reply.kept, s.strategy, prior))
        return AggregateRound(rebuilt, bounds, fed.aggregate(rebuilt, s.weights), fed.aggregate_bound(bounds, s.weights))

    def verdict(self, proposal: DraftProposal, replies: Sequence[FederatedRows]) -> tuple[VerifyResult, AggregateRound]:
        """The round's verdict against the reconstructed average, and what the aggregation did."""
        params = self._params.get(proposal.session_id)
        if params is None:
            raise KeyError(f"the aggregator has no open session {proposal.session_id!r}")
        agg = self.aggregate(proposal, replies)
        gen = sampling.generator_for(params.seed, sampling.STREAM_VERIFY, proposal.base)
        verdict = verify_average(proposal, agg.average.float(), params.temperature, gen)
        result = VerifyResult(
            session_id=proposal.session_id, round=proposal.round, accepted=verdict.accepted,
            tokens=verdict.tokens, accepted_mask=verdict.accepted_mask,
            path=list(getattr(verdict, "path", [])) if proposal.parents else [],
            stage_ms=[sum(r.stage_ms) for r in replies], draft_ms=proposal.draft_ms,
        )
        return result, agg


def verify_average(proposal: DraftProposal, average: torch.Tensor, temperature: float,
                   generator: torch.Generator) -> Verdict:
    """The shared verifiers on the averaged p ``[g + 1, V]``: greedy at temperature 0, exact otherwise."""
    q: SparseDist = proposal.q
    if proposal.parents:
        tree = TokenTree(proposal.candidates, proposal.parents)
        if temperature == 0:
            return verify_tree_greedy(tree, average)
        return verify_tree_exact(tree, q, average, generator)
    if temperature == 0:
        return verify_greedy(proposal.candidates, average)
    return verify_exact(proposal.candidates, q, average, generator)
