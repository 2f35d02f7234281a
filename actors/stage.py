"""A target stage (edge side): a contiguous slice of the target's layers and their KV cache.

A plain class: tests call it directly, Ray wraps it in one place (``actors/remote.py``). Each round it
rolls its cache back to the position the message carries, runs its layers over every fed token
(uncached context, then candidates) at once and passes the hidden states on; the last stage turns them
into p and applies the session's acceptance policy (the verifier).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from typing import Callable, Sequence

from specmesh.policies.acceptance import AcceptanceRule, verify_round
from specmesh.policies.catalog import make_rule
from specmesh.policies.code_context import FollowsSource, SourceContext
from specmesh.policies.split import verification_mode, verify_split
from specmesh.runtime import sampling
from specmesh.runtime.messages import DraftProposal, OpenSession, SamplingParams, StageFrame, VerifyResult
from specmesh.runtime.tree import TokenTree, accepted_slots, tree_attention_mask, tree_position_ids

from . import batched, hf, lowbit


@dataclass
class _StageSession:
    params: SamplingParams
    rule: AcceptanceRule | None  # the last stage's acceptance rule (None elsewhere)
    cache: object
    last_round: int = 0
    # (rollback, context length) of the last round when it fed a tree: the next message's prev_path
    # says which of its candidates to keep.
    tree_layout: tuple[int, int] | None = None
    # the session's text as the rule follows it (rules that tell comments from code), else None
    source: SourceContext | None = None


class TargetStage:
    """Stage ``index`` of ``num_stages`` of the target pipeline.

    Args:
        model: the loaded slice (first stage: embeddings; last: norm and LM head).
        threads: torch intra-op threads for this worker (None leaves the process default).
        vocab: loads the vocabulary's token strings by id, for acceptance rules with a lexicon
            (called once, when the first session that asks for a rule other than ``exact`` opens).
        weights: the linear layers' weight format (``actors/lowbit.py``), applied here, once.
        dtype: the dtype it computes in (None: the model's as loaded).
    """

    def __init__(self, model: hf.StageModel, threads: int | None = None,
                 vocab: Callable[[], Sequence[str]] | None = None, weights: str = "auto",
                 dtype: torch.dtype | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        model.formats = lowbit.apply(model.module, weights, lowbit.STAGE_WORK, dtype)  # after threads: auto times
        self.model = model
        self.sessions: dict[str, _StageSession] = {}
        self._vocab_loader = vocab
        self._vocab: Sequence[str] | None = None

    def open(self, msg: OpenSession) -> None:
        """Creates the session's state; a bad policy name or option fails here, not mid-round."""
        rule = None
        if self.model.is_last:
            wants_vocab = msg.policy.get("acceptance", "exact") != "exact"
            if wants_vocab and self._vocab is None and self._vocab_loader is not None:
                self._vocab = self._vocab_loader()
            rule = make_rule(msg.policy, self._vocab)
            verification_mode(msg.policy)  # a bad placement fails here, not mid-round
        source = rule.source_context() if isinstance(rule, FollowsSource) else None
        self.sessions[msg.session_id] = _StageSession(msg.params, rule, self.model.new_cache(), source=source)

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def cached_positions(self, session_id: str) -> int:
        return hf.cache_length(self._session(session_id).cache)

    def step(self, msg: DraftProposal | StageFrame) -> StageFrame | VerifyResult:
        """Processes one round's message: a proposal (first stage) or a frame (later stages)."""
        t0 = time.perf_counter()
        s, proposal, positions, mask = self._admit(msg)
        hidden = self._forward_alone(self._fed(msg, s, proposal, positions, mask))
        if isinstance(hidden, Exception):
            raise hidden
        return self._finish(s, proposal, msg, hidden, t0)

    def step_many(self, msgs: Sequence[DraftProposal | StageFrame]) -> list:
        """Processes several sessions' round messages with one forward (batched rounds).

        Per session the same as :meth:`step` (its own rollback, positions, tree mask and verdict),
        up to float rounding; one message alone takes :meth:`step` itself.

        Returns:
            per message, in order, what :meth:`step` returns for it, or the exception it raised
            there: a bad message fails only itself.
        """
        if len(msgs) == 1:
            try:
                return [self.step(msgs[0])]
            except Exception as exc:
                return [exc]
        out: list = [None] * len(msgs)
        admitted, seen = [], set()
        t0 = time.perf_counter()
        for i, msg in enumerate(msgs):
            try:
                sid = (msg if isinstance(msg, DraftProposal) else msg.proposal).session_id
                if sid in seen:
                    raise ValueError(f"two rounds of session {sid!r} in one batch")
                admitted.append((i, msg, *self._admit(msg)))
                seen.add(sid)
            except Exception as exc:
                out[i] = exc
        fed = [self._fed(msg, s, proposal, positions, mask) for _, msg, s, proposal, positions, mask in admitted]
        try:
            hiddens: list = batched.forward_grouped(self.model, fed)
        except Exception:  # one bad input (e.g. hidden states of the wrong width) fails only itself
            hiddens = [self._forward_alone(f) for f in fed]
        for (i, msg, s, proposal, _, _), hidden in zip(admitted, hiddens):
            try:
                if isinstance(hidden, Exception):
                    raise hidden
                out[i] = self._finish(s, proposal, msg, hidden, t0)
            except Exception as exc:
                out[i] = exc
        return out

    def federated_p(self, msg: DraftProposal | StageFrame) -> tuple[DraftProposal, torch.Tensor, list[float]]:
        """SpecFed: the last stage of a federated worker runs the round as :meth:`step` does but
        answers its warped p rows instead of a verdict; the aggregator on the device verifies the
        draft against the weighted average of every worker's p.

        Returns:
            the proposal, ``p`` ``[g + 1, V]`` float32 after the session's warpers (row 0 after the
            last context token, row ``1 + i`` after candidate ``i``) and the stage times so far.
        """
        if not self.model.is_last:
            raise ValueError(f"stage holding layers {self.model.layers} is not a last stage: use step")
        t0 = time.perf_counter()
        s, proposal, positions, mask = self._admit(msg)
        hidden = self._forward_alone(self._fed(msg, s, proposal, positions, mask))
        if isinstance(hidden, Exception):
            raise hidden
        logits = hf.lm_head(self.model, hidden[-(proposal.num_candidates + 1):])  # [g + 1, V]
        p = s.params
        probs = sampling.warp_logits(logits, p.temperature, p.top_k, p.top_p)  # [g + 1, V]
        prior_ms = [] if isinstance(msg, DraftProposal) else list(msg.stage_ms)
        return proposal, probs, prior_ms + [(time.perf_counter() - t0) * 1e3]

    def _admit(self, msg: DraftProposal | StageFrame):
        """:meth:`step` up to the forward: checks, rollback, layout -> (session, proposal,
        positions ``[n]``, tree mask or None)."""
        proposal = msg if isinstance(msg, DraftProposal) else msg.proposal
        if isinstance(msg, DraftProposal) != self.model.is_first:
            raise ValueError(f"stage holding layers {self.model.layers} got a {type(msg).__name__}")
        s = self._session(proposal.session_id)
        if proposal.round <= s.last_round:
            raise ValueError(
                f"stale round {proposal.round} for session {proposal.session_id} (at {s.last_round})"
            )
        if not proposal.context:
            raise ValueError("a round must carry at least one uncached context token")
        s.last_round = proposal.round
        self._rollback(s, proposal)
        positions, mask = self._layout(proposal, self.model.dtype)
        return s, proposal, positions, mask

    def _fed(self, msg, s: _StageSession, proposal: DraftProposal, positions: torch.Tensor,
             mask: torch.Tensor | None) -> batched.Fed:
        if self.model.is_first:
            ids = torch.cat([torch.tensor(proposal.context, dtype=torch.int64), proposal.candidates])
            return batched.Fed(s.cache, positions, mask, input_ids=ids)
        return batched.Fed(s.cache, positions, mask, hidden=msg.hidden)

    def _forward_alone(self, f: batched.Fed) -> torch.Tensor | Exception:
        try:
            return batched.forward_alone(self.model, f)
        except Exception as exc:
            return exc

    def _finish(self, s: _StageSession, proposal: DraftProposal, msg, hidden: torch.Tensor,
                t0: float) -> StageFrame | VerifyResult:
        """:meth:`step` after the forward: the next stage's frame, or the verdict."""
        prior_ms = [] if isinstance(msg, DraftProposal) else list(msg.stage_ms)
        if not self.model.is_last:
            return StageFrame(proposal, hidden, prior_ms + [(time.perf_counter() - t0) * 1e3])
        verdict = self._verify(s, proposal, hidden)
        return VerifyResult(
            session_id=proposal.session_id, round=proposal.round, accepted=verdict.accepted,
            tokens=verdict.tokens, accepted_mask=verdict.accepted_mask,
            path=list(getattr(verdict, "path", [])) if proposal.parents else [],
            stage_ms=prior_ms + [(time.perf_counter() - t0) * 1e3], draft_ms=proposal.draft_ms,
            correction_p=getattr(verdict, "correction_p", None),
        )

    def _rollback(self, s: _StageSession, proposal: DraftProposal) -> None:
        """Keeps the committed prefix: the accepted path of a tree round, then ``rollback`` positions."""
        if s.tree_layout is not None:
            cached, context = s.tree_layout
            slots = accepted_slots(proposal.prev_path, num_cached=cached, num_context=context)
            if int(slots.numel()) < proposal.rollback:
                raise ValueError(
                    f"rollback {proposal.rollback} beyond the {int(slots.numel())} positions the "
                    f"accepted path {proposal.prev_path} keeps"
                )
            hf.select_cache_positions(s.cache, slots)
        hf.truncate_cache(s.cache, proposal.rollback)
        s.tree_layout = (proposal.rollback, len(proposal.context)) if proposal.parents else None

    @staticmethod
    def _layout(proposal: DraftProposal, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions ``[fed]`` of the fed tokens, and the tree mask in the model's dtype (None for a
        chain: causal)."""
        if not proposal.parents:
            fed = len(proposal.context) + proposal.num_candidates
            return torch.arange(proposal.rollback, proposal.rollback + fed), None
        kw = dict(num_cached=proposal.rollback, num_context=len(proposal.context))
        return tree_position_ids(proposal.parents, **kw)[0], tree_attention_mask(proposal.parents, dtype=dtype, **kw)

    def _verify(self, s: _StageSession, proposal: DraftProposal, hidden: torch.Tensor):
        g = proposal.num_candidates
        # p after the last context token and after each candidate: g + 1 rows.
        logits = hf.lm_head(self.model, hidden[-(g + 1) :])  # [g + 1, V]
        p = s.params
        gen = sampling.generator_for(p.seed, sampling.STREAM_VERIFY, proposal.base)
        warp = lambda raw: sampling.warp_logits(raw, p.temperature, p.top_k, p.top_p)  # noqa: E731
        lexical = prose = None
        if s.source is not None and not proposal.parents:
            lexical, prose = s.rule.round_lexicon(s.source, proposal.rollback, proposal.context, proposal.candidates)
        if proposal.split:  # DSSD: accept tests on q(x) alone; at a rejection p_j goes down
            return verify_split(s.rule, proposal.candidates, proposal.q_x, logits, p, gen, warp, lexical, prose)
        tree = TokenTree(proposal.candidates, proposal.parents) if proposal.parents else TokenTree.chain(proposal.candidates)
        return verify_round(s.rule, tree, proposal.q, logits, p, gen, warp, lexical, prose)

    def _session(self, session_id: str) -> _StageSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"stage {self.model.layers} has no open session {session_id!r}") from None
