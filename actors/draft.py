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


# One drafted depth: the sibling tokens (the first is the one extended) and the q row of each.
Depth = tuple[list[int], SparseDist]


@dataclass
class _DraftSession:
    params: SamplingParams
    cache: object
    cached: list[int] = field(default_factory=list)  # tokens whose keys/values are in the cache
    committed: list[int] = field(default_factory=list)  # committed tokens told so far
    last_round: int = 0
    width: int = 1
    depths: list[Depth] = field(default_factory=list)  # the last proposal's depths
    # Speculation on the verdict: depths drafted for the context ``spec_context`` (the last proposal
    # fully accepted plus the draft's own guess of the bonus token), reused if that is what commits.
    spec_context: list[int] | None = None
    spec_depths: list[Depth] = field(default_factory=list)
    counters: dict[str, int] = field(
        # forwards: draft depths computed (speculative ones and bonus guesses included);
        # speculated: those computed ahead of a verdict; reused: speculative depths later proposed.
        # busy_ms: time spent computing.
        default_factory=lambda: {"forwards": 0, "speculated": 0, "reused": 0, "busy_ms": 0}
    )


class DraftWorker:
    """Proposes candidate tokens for each round of every open session.

    Drafting is a pure function of (committed context, seed, position): every draw uses the
    generator keyed by its position, so depths drafted ahead of time (speculation on the verdict)
    are exactly the depths a later proposal would draft, and overlap never changes the output.

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

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def open(self, msg: OpenSession) -> None:
        self.sessions[msg.session_id] = _DraftSession(msg.params, self.model.new_cache())

    def close(self, session_id: str) -> dict[str, int]:
        """Frees the session; returns its drafting counters (forwards, speculated, reused)."""
        s = self.sessions.pop(session_id, None)
        return dict(s.counters) if s is not None else {}

    def propose(self, req: ProposeRequest) -> DraftProposal:
        """Syncs the cache with the committed tokens and drafts ``req.gamma`` depths."""
        s = self._session(req.session_id)
        if req.round <= s.last_round:
            raise ValueError(f"stale round {req.round} for session {req.session_id} (at {s.last_round})")
        if req.start > len(s.committed):
            raise ValueError(f"tokens start at {req.start} but only {len(s.committed)} were committed")
        s.committed = s.committed[: req.start] + list(req.tokens)
        s.last_round = req.round
        s.width = req.width
        t0 = time.perf_counter()
        s.depths = self._draft(s, req.gamma) if req.gamma > 0 else []
        s.counters["busy_ms"] += round((time.perf_counter() - t0) * 1e3)
        tokens: list[int] = []
        parents: list[int] = []
        main = -1  # the candidate the next depth hangs from (-1: the last context token)
        for picks, _ in s.depths:
            first = len(tokens)
            tokens.extend(picks)
            parents.extend([main] * len(picks))
            main = first
        q = SparseDist.concat([rows for _, rows in s.depths]) if s.depths else SparseDist.empty(self.vocab_size)
        return DraftProposal(
            session_id=req.session_id,
            round=req.round,
            rollback=req.target_rollback,
            context=s.committed[req.target_rollback :],
            candidates=torch.tensor(tokens, dtype=torch.int64),
            q=q,
            parents=parents if req.width > 1 else [],
            prev_path=list(req.prev_path),
        )

    def speculate(self, session_id: str, gamma: int) -> None:
        """While the last proposal is verified, drafts the next round as if it were fully accepted
        and the bonus token were the draft's own next token (the likeliest single outcome)."""
        s = self._session(session_id)
        if not s.depths or gamma < 1:
            return
        t0 = time.perf_counter()
        mains = [picks[0] for picks, _ in s.depths]
        context = s.committed + mains
        logits = self._forward(s, [mains[-1]])  # the last main token was never fed
        guess, _ = self._siblings(s.params, logits, 1, self._generator(s, len(context)))
        spec = context + guess[:1]
        s.spec_context = spec
        s.spec_depths = self._extend(s, [], gamma, spec, [guess[0]])
        s.counters["forwards"] += 1  # the bonus guess
        s.counters["speculated"] += len(s.spec_depths) + 1
        s.counters["busy_ms"] += round((time.perf_counter() - t0) * 1e3)

    def _session(self, session_id: str) -> _DraftSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"draft worker has no open session {session_id!r}") from None

    def _generator(self, s: _DraftSession, position: int) -> torch.Generator:
        return sampling.generator_for(s.params.seed, sampling.STREAM_DRAFT, position)

    def _draft(self, s: _DraftSession, gamma: int) -> list[Depth]:
        """``gamma`` depths of ``s.width`` siblings for the committed context, reusing speculation."""
        committed = s.committed
        reuse = s.spec_depths if s.spec_context == committed else []
        s.spec_context, s.spec_depths = None, []
        if reuse:
            # The cache holds committed + the main token of every reused depth but the last.
            s.counters["reused"] += min(len(reuse), gamma)
            if len(reuse) >= gamma:
                self._truncate(s, len(committed) + gamma - 1)
                return reuse[:gamma]
            return self._extend(s, reuse, gamma, committed, [reuse[-1][0][0]])
        # Keep the longest cached prefix that is still committed, but always re-feed at least the
        # last committed token: its logits give the first draft.
        keep = 0
        limit = min(len(s.cached), len(committed) - 1)
        while keep < limit and s.cached[keep] == committed[keep]:
            keep += 1
        self._truncate(s, keep)
        return self._extend(s, [], gamma, committed, committed[keep:])

    def _extend(
        self, s: _DraftSession, depths: list[Depth], gamma: int, context: list[int], feed: list[int]
    ) -> list[Depth]:
        """Drafts depths after ``depths`` until there are ``gamma``; ``feed`` completes the cache.

        Leaves the cache holding ``context`` and the main token of every depth but the last.
        """
        depths = list(depths)
        while len(depths) < gamma:
            logits = self._forward(s, feed)  # [V]
            gen = self._generator(s, len(context) + len(depths))
            depths.append(self._siblings(s.params, logits, s.width, gen))
            s.counters["forwards"] += 1
            feed = [depths[-1][0][0]]
        return depths

    def _truncate(self, s: _DraftSession, keep: int) -> None:
        hf.truncate_cache(s.cache, keep)
        s.cached = s.cached[:keep]

    def _siblings(
        self, params: SamplingParams, logits: torch.Tensor, width: int, gen: torch.Generator
    ) -> tuple[list[int], SparseDist]:
        """Samples ``width`` siblings from the sparsified q, without replacement.

        Row ``j`` is the distribution sibling ``j`` was drawn from (q with the earlier siblings
        removed, renormalised), each exactly as it will decode at the verifier: the contract that
        keeps multi-candidate verification lossless (see ``runtime/tree.py``). At temperature 0 the
        verifier compares with its argmax only: siblings are the draft's top tokens, each shipped
        with a one-entry q (the fewest bytes the wire accepts), except under the ``dense``
        sparsifier, whose point is to send what the classic scheme sends: the whole q.
        """
        if params.temperature == 0:
            top = torch.topk(logits, min(width, logits.numel())).indices  # [width]
            if params.sparsifier == "dense":
                q = sparsify(torch.softmax(logits.float().view(1, -1), -1), params)
                return top.tolist(), SparseDist.concat([q] * top.numel())
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
