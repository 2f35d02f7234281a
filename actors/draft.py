"""The draft worker (device side): holds the draft model and a KV cache per session, proposes tokens.

A plain class: tests call it directly, Ray wraps it in one place (``actors/remote.py``).
For every drafted position it warps the draft logits with the session's sampling parameters,
sparsifies (top-K / top-p), and samples from exactly that sparse q, which it ships in the proposal.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specmesh.policies.sparsify import sparsify
from specmesh.runtime import codec, sampling
from specmesh.runtime.messages import DraftProposal, OpenSession, ProposeRequest, SamplingParams
from specmesh.runtime.sparse import SparseDist

from . import hf


@dataclass
class _DraftSession:
    params: SamplingParams
    cache: object
    cached: list[int] = field(default_factory=list)  # tokens whose keys/values are in the cache
    committed: list[int] = field(default_factory=list)  # committed tokens told so far
    last_round: int = 0


class DraftWorker:
    """Proposes candidate tokens for each round of every open session.

    Args:
        model: the loaded draft (one stage holding every layer).
        threads: torch intra-op threads for this worker (None leaves the process default).
    """

    def __init__(self, model: hf.StageModel, threads: int | None = None) -> None:
        if not (model.is_first and model.is_last):
            raise ValueError("the draft model must hold every layer (embeddings to LM head)")
        if threads:
            torch.set_num_threads(threads)
        self.model = model
        self.sessions: dict[str, _DraftSession] = {}
        self.last_draft_ms = 0.0

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def open(self, msg: OpenSession) -> None:
        self.sessions[msg.session_id] = _DraftSession(msg.params, self.model.new_cache())

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def propose(self, req: ProposeRequest) -> DraftProposal:
        """Syncs the cache with the committed tokens and drafts ``req.gamma`` tokens."""
        s = self._session(req.session_id)
        if req.round <= s.last_round:
            raise ValueError(f"stale round {req.round} for session {req.session_id} (at {s.last_round})")
        if req.start > len(s.committed):
            raise ValueError(f"tokens start at {req.start} but only {len(s.committed)} were committed")
        s.committed = s.committed[: req.start] + list(req.tokens)
        s.last_round = req.round
        t0 = time.perf_counter()
        candidates, parents, q = self._draft(s, req.gamma, req.width)
        self.last_draft_ms = (time.perf_counter() - t0) * 1e3
        return DraftProposal(
            session_id=req.session_id,
            round=req.round,
            rollback=req.target_rollback,
            context=s.committed[req.target_rollback :],
            candidates=torch.tensor(candidates, dtype=torch.int64),
            q=q,
            parents=parents if req.width > 1 else [],
            prev_path=list(req.prev_path),
        )

    def _session(self, session_id: str) -> _DraftSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"draft worker has no open session {session_id!r}") from None

    def _draft(
        self, s: _DraftSession, gamma: int, width: int
    ) -> tuple[list[int], list[int], SparseDist]:
        """Drafts ``gamma`` depths of ``width`` siblings; extends the first sibling of each depth.

        Returns candidate tokens, their tree parents and the q row each was drawn from.
        """
        if gamma == 0:
            return [], [], SparseDist.empty(self.vocab_size)
        committed = s.committed
        # Keep the longest cached prefix that is still committed, but always re-feed at least the
        # last committed token: its logits give the first draft.
        keep = 0
        limit = min(len(s.cached), len(committed) - 1)
        while keep < limit and s.cached[keep] == committed[keep]:
            keep += 1
        hf.truncate_cache(s.cache, keep)
        s.cached = s.cached[:keep]
        feed = committed[keep:]
        tokens: list[int] = []
        parents: list[int] = []
        rows: list[SparseDist] = []
        main = -1  # the candidate the next depth hangs from (-1: the last context token)
        for depth in range(gamma):
            logits = self._forward(s, feed)  # [vocab]
            gen = sampling.generator_for(s.params.seed, sampling.STREAM_DRAFT, len(committed) + depth)
            picks, q_rows = self._siblings(s.params, logits, width, gen)
            first = len(tokens)
            tokens.extend(picks)
            parents.extend([main] * len(picks))
            rows.append(q_rows)
            main = first
            feed = [picks[0]]  # the last depth is never fed: its logits are not needed
            if depth == gamma - 1:
                break
        return tokens, parents, SparseDist.concat(rows)

    def _siblings(
        self, params: SamplingParams, logits: torch.Tensor, width: int, gen: torch.Generator
    ) -> tuple[list[int], SparseDist]:
        """Samples ``width`` siblings from the sparsified q, without replacement.

        Row ``j`` is the distribution sibling ``j`` was drawn from (q with the earlier siblings
        removed, renormalised), each exactly as it will decode at the verifier: the contract that
        keeps multi-candidate verification lossless (see ``runtime/tree.py``). At temperature 0 the
        verifier compares with its argmax only: siblings are the draft's top tokens, each shipped
        with a one-entry q (the fewest bytes the wire accepts).
        """
        if params.temperature == 0:
            top = torch.topk(logits, min(width, logits.numel())).indices  # [width]
            ones = torch.ones(top.numel(), 1)
            return top.tolist(), SparseDist(top.view(-1, 1), ones, self.vocab_size)
        probs = sampling.warp_logits(logits.view(1, -1), params.temperature, params.top_k, params.top_p)
        q = codec.quantise_sparse(sparsify(probs, params))  # [1, k]
        picks: list[int] = []
        rows: list[SparseDist] = []
        for _ in range(width):
            j = int(sampling.sample(q.probs, gen)[0])
            picks.append(int(q.indices[0, j]))
            rows.append(q)
            rest = q.probs.clone()
            rest[0, j] = 0.0
            if float(rest.sum()) <= 0:
                break  # q's support is exhausted
            q = codec.quantise_sparse(SparseDist(q.indices, rest / rest.sum(), q.vocab_size))
        return picks, SparseDist.concat(rows)

    def _forward(self, s: _DraftSession, feed: list[int]) -> torch.Tensor:
        start = len(s.cached)
        ids = torch.tensor(feed, dtype=torch.int64)
        pos = torch.arange(start, start + len(feed))
        hidden = hf.forward(self.model, s.cache, input_ids=ids, position_ids=pos)
        s.cached.extend(feed)
        return hf.lm_head(self.model, hidden[-1:])[0]
