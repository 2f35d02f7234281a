"""The draft worker (device side): holds the draft model and a KV cache per session, proposes tokens.

A plain class: tests call it directly, Ray wraps it in one place (``actors/remote.py``).
Drafting is built from one step, :meth:`DraftWorker.draft_depth`: the siblings at the depth after a
given context. A proposal is a loop of steps along its main branch; speculation on the verdict is
the same loop on a guessed context. For every drafted position the step warps the draft logits with
the session's sampling parameters, lets the session's sparsifier truncate them, and samples from
exactly that sparse q (as the wire will carry it), which the proposal ships.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specmesh.policies import split
from specmesh.policies.sparsify import Sparsifier, make_sparsifier
from specmesh.runtime import sampling
from specmesh.runtime.messages import DraftProposal, OpenSession, ProposeRequest, SamplingParams, VerifyResult
from specmesh.runtime.sparse import SparseDist, normalised, quantise_fp16
from specmesh.runtime.tree import sample_siblings

from . import hf
from .speculation import Branch, alternative_verdicts, snapshot


@dataclass(frozen=True)
class Depth:
    """One drafted depth: sibling tokens (the first is the one extended), the q row each was drawn
    from, the draft's top probability there (for confidence stopping) and its likeliest token
    other than the first sibling (speculation's guess of a correction there)."""

    tokens: list[int]
    q: SparseDist  # len(tokens) rows
    top_prob: float
    runner_up: int | None = None


@dataclass
class _DraftSession:
    params: SamplingParams
    sparsifier: Sparsifier
    cache: object
    split: bool = False  # split verification: ship q(x) per candidate, keep the rows, draw corrections
    cached: list[int] = field(default_factory=list)  # tokens whose keys/values are in the cache
    last_logits: torch.Tensor | None = None  # [V] after cached[-1]
    committed: list[int] = field(default_factory=list)  # committed tokens told so far
    last_round: int = 0
    depths: list[Depth] = field(default_factory=list)  # the last proposal's depths
    # Speculation on the verdict: depths drafted ahead for the likeliest verdicts, best first
    # (actors/speculation.py), reused by the proposal whose committed tokens one of them guessed.
    spec_branches: list[Branch] = field(default_factory=list)
    counters: dict[str, int] = field(
        # forwards: draft depths computed (speculative ones and bonus guesses included);
        # speculated: those computed ahead of a verdict; reused: speculative depths later proposed;
        # proposals_hit: proposals that reused speculation (hits_alt: on a verdict other than the
        # likeliest); branches: verdicts drafted ahead for; busy_ms: time spent computing.
        default_factory=lambda: {"forwards": 0, "speculated": 0, "reused": 0, "proposals": 0,
                                 "proposals_hit": 0, "hits_alt": 0, "branches": 0, "busy_ms": 0}
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
        # Sessions whose next proposal has arrived while they speculate: speculation stops after
        # the depth in hand (set from another thread; a set's add and membership are atomic).
        self._interrupted: set[str] = set()

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def open(self, msg: OpenSession) -> None:
        """Creates the session's state; a bad sparsifier name or option fails here, not mid-round."""
        sparsifier = make_sparsifier(msg.policy)
        splits = split.verification_mode(msg.policy) == split.SPLIT
        self.sessions[msg.session_id] = _DraftSession(msg.params, sparsifier, self.model.new_cache(), splits)

    def close(self, session_id: str) -> dict[str, int]:
        """Frees the session; returns its drafting counters."""
        s = self.sessions.pop(session_id, None)
        return dict(s.counters) if s is not None else {}

    def draft_depth(self, session_id: str, context: list[int], width: int = 1) -> Depth:
        """The step: ``width`` siblings at the position after ``context`` (the cache follows it)."""
        s = self._session(session_id)
        return self._depth(s, context, width)

    def propose(self, req: ProposeRequest) -> DraftProposal:
        """Syncs with the committed tokens and drafts up to ``req.gamma`` depths (fewer when the
        draft's confidence falls below ``req.stop_below``)."""
        s = self._session(req.session_id)
        if req.round <= s.last_round:
            raise ValueError(f"stale round {req.round} for session {req.session_id} (at {s.last_round})")
        if req.start > len(s.committed):
            raise ValueError(f"tokens start at {req.start} but only {len(s.committed)} were committed")
        self._interrupted.discard(req.session_id)
        s.committed = s.committed[: req.start] + list(req.tokens)
        s.last_round = req.round
        t0 = time.perf_counter()
        s.depths = self._draft(s, req.gamma, req.width, req.stop_below) if req.gamma > 0 else []
        draft_ms = (time.perf_counter() - t0) * 1e3
        s.counters["busy_ms"] += round(draft_ms)
        tokens: list[int] = []
        parents: list[int] = []
        main = -1  # the candidate the next depth hangs from (-1: the last context token)
        for d in s.depths:
            first = len(tokens)
            tokens.extend(d.tokens)
            parents.extend([main] * len(d.tokens))
            main = first
        q = self._shipped_q(s)
        q_x = None
        if s.split:  # q(x) of each candidate under its row, exactly as target-side verification reads it
            if req.width > 1:
                raise ValueError(f"split verification verifies chains only, got width {req.width}")
            q_x = normalised(q).prob_of(torch.tensor(tokens, dtype=torch.int64)) if s.depths else torch.zeros(0)
            q = SparseDist.empty(self.vocab_size)
        return DraftProposal(
            session_id=req.session_id,
            round=req.round,
            rollback=req.target_rollback,
            context=s.committed[req.target_rollback :],
            candidates=torch.tensor(tokens, dtype=torch.int64),
            q=q,
            parents=parents if req.width > 1 else [],
            prev_path=list(req.prev_path),
            draft_ms=draft_ms,
            q_x=q_x,
        )

    def interrupt(self, session_id: str) -> None:
        """The session's next proposal is here: its speculation, running or queued, stops after the
        depth in hand (callable from any thread)."""
        self._interrupted.add(session_id)

    def resolve(self, verdict: VerifyResult) -> int:
        """Split verification: the correction of a verdict rejected at ``j = verdict.accepted``,
        drawn from ``norm(max(p_j - q_j, 0))`` with the ``q_j`` this worker sampled ``x_j`` from and
        the verifier's generator for the round (``split.correction_generator``), so the token is the
        one target-side verification would have drawn."""
        s = self._session(verdict.session_id)
        if verdict.round != s.last_round or verdict.correction_p is None:
            raise ValueError(f"no correction pending for round {verdict.round} of session "
                             f"{verdict.session_id} (last proposal: round {s.last_round})")
        j, drafted = verdict.accepted, [d.tokens[0] for d in s.depths]
        if j >= len(drafted) or list(verdict.tokens) != drafted[:j] or any(len(d.tokens) > 1 for d in s.depths):
            raise ValueError(f"verdict accepts {verdict.tokens} at depth {j}; round {s.last_round} drafted "
                             f"the chain {drafted}")
        q_row = normalised(self._shipped_q(s)).row(j)  # the row target-side verification would use
        # The proposal was drafted after the committed tokens: the round's base position.
        gen = split.correction_generator(s.params.seed, len(s.committed), len(drafted), s.params.temperature)
        return split.draw_correction(verdict.correction_p, q_row, gen, s.params.temperature)

    def _shipped_q(self, s: _DraftSession) -> SparseDist:
        """The last proposal's q rows, as target-side verification ships them."""
        return SparseDist.concat([d.q for d in s.depths]) if s.depths else SparseDist.empty(self.vocab_size)

    def speculate(self, session_id: str, gamma: int, width: int = 1, budget_ms: float | None = None) -> None:
        """While the last proposal is verified, drafts the next round ahead for the likeliest
        verdicts, best first (``actors/speculation.py``): all accepted with the draft's own bonus
        guess; then, for chains, the last candidate rejected with the draft's runner-up there, and
        all accepted with its runner-up bonus.

        ``budget_ms``: stop after the depth that ends past this much time (the verification's
        expected length), so that speculation never delays the next proposal."""
        s = self._session(session_id)
        if not s.depths or gamma < 1 or session_id in self._interrupted:
            return
        t0 = time.perf_counter()
        deadline = None if budget_ms is None else t0 + budget_ms / 1e3
        stop = lambda: session_id in self._interrupted  # noqa: E731 (the verdict arrived)
        drafted = [d.tokens[0] for d in s.depths]
        context = s.committed + drafted
        bonus = self._depth(s, context, 1)
        s.counters["speculated"] += 1
        guesses = [context + [bonus.tokens[0]]]
        if width == 1:
            guesses += alternative_verdicts(s.committed, drafted, s.depths[-1].runner_up, bonus.runner_up)
        s.spec_branches = []
        for guess in guesses:
            if s.spec_branches and (stop() or (deadline is not None and time.perf_counter() >= deadline)):
                break
            if s.spec_branches:  # the live cache moves on: keep the previous branch's state
                s.spec_branches[-1].state = snapshot(s.cache, s.cached, s.last_logits)
            depths = self._extend(s, [], gamma, guess, width, None, deadline, stop)
            s.spec_branches.append(Branch(guess, depths))
            s.counters["speculated"] += len(depths)
            s.counters["branches"] += 1
        s.counters["busy_ms"] += round((time.perf_counter() - t0) * 1e3)

    def _session(self, session_id: str) -> _DraftSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"draft worker has no open session {session_id!r}") from None

    def _draft(self, s: _DraftSession, gamma: int, width: int, stop_below: float | None) -> list[Depth]:
        """Depths for the committed context, reusing speculation that drafted this very context."""
        hit = next((i for i, b in enumerate(s.spec_branches) if b.context == s.committed), None)
        reuse: list[Depth] = []
        if hit is not None:
            branch = s.spec_branches[hit]
            if branch.state is not None:  # a later branch moved the live cache: restore this one's
                s.cache, s.cached, s.last_logits = branch.state
            reuse = branch.depths[:gamma]
        s.spec_branches = []
        s.counters["proposals"] += 1
        if reuse:
            s.counters["proposals_hit"] += 1
            s.counters["hits_alt"] += int(hit > 0)
            if stop_below is not None:
                cut = next((i + 1 for i, d in enumerate(reuse) if d.top_prob < stop_below), None)
                if cut is not None:  # the draft's confidence stopped inside the reused depths
                    s.counters["reused"] += cut
                    return reuse[:cut]
            s.counters["reused"] += len(reuse)
        return self._extend(s, reuse, gamma, s.committed, width, stop_below)

    def _extend(self, s: _DraftSession, depths: list[Depth], gamma: int, context: list[int],
                width: int, stop_below: float | None, deadline: float | None = None,
                stop=lambda: False) -> list[Depth]:
        """Drafts depths after ``depths`` along their main branch until there are ``gamma`` (or the
        draft's confidence drops below ``stop_below``, or the clock passes ``deadline``, or
        ``stop()`` says the verdict arrived)."""
        depths = list(depths)
        while len(depths) < gamma and (deadline is None or time.perf_counter() < deadline) and not stop():
            depth = self._depth(s, context + [d.tokens[0] for d in depths], width)
            depths.append(depth)
            if stop_below is not None and depth.top_prob < stop_below:
                break
        return depths

    def _depth(self, s: _DraftSession, context: list[int], width: int) -> Depth:
        logits = self._logits_after(s, context)  # [V]
        gen = sampling.generator_for(s.params.seed, sampling.STREAM_DRAFT, len(context))
        s.counters["forwards"] += 1
        return self._siblings(s, logits, width, gen)

    def _siblings(self, s: _DraftSession, logits: torch.Tensor, width: int, gen: torch.Generator) -> Depth:
        """``width`` siblings drawn without replacement from the sparsified q (``tree.sample_siblings``,
        each row exactly as it will decode at the verifier). At temperature 0 the siblings are the
        draft's top tokens, shipped with what the sparsifier says greedy rows carry."""
        params = s.params
        top_prob = float(torch.softmax(logits.float(), -1).max())
        best = torch.topk(logits, min(2, logits.numel())).indices.tolist()  # the draft's top two
        if params.temperature == 0:
            picks = torch.topk(logits, min(width, logits.numel())).indices  # [width]
            rows = s.sparsifier.greedy_rows(logits, picks)
        else:
            probs = sampling.warp_logits(logits.view(1, -1), params.temperature, params.top_k, params.top_p)
            picks, rows = sample_siblings(s.sparsifier(probs), width, gen, quantise=quantise_fp16)
        first = int(picks[0])
        others = [t for t in best if t != first]
        return Depth(picks.tolist(), rows, top_prob, others[0] if others else None)

    def _logits_after(self, s: _DraftSession, context: list[int]) -> torch.Tensor:
        """The draft's logits ``[V]`` after ``context``: keeps the longest cached prefix of it and
        feeds the rest (always at least the last token, unless the cache ends exactly there)."""
        n = len(context)
        if s.last_logits is not None and len(s.cached) == n and s.cached == context:
            return s.last_logits
        keep = 0
        limit = min(len(s.cached), n - 1)
        while keep < limit and s.cached[keep] == context[keep]:
            keep += 1
        hf.truncate_cache(s.cache, keep)
        s.cached = s.cached[:keep]
        s.last_logits = self._feed(s, context, keep, n)
        return s.last_logits

    def _feed(self, s: _DraftSession, context: list[int], start: int, stop: int) -> torch.Tensor:
        """Feeds ``context[start:stop]`` after the cached prefix in one forward (every weight format
        keeps a row's output independent of the rows beside it); the logits ``[V]`` after the last."""
        ids = torch.tensor(context[start:stop], dtype=torch.int64)
        hidden = hf.forward(self.model, s.cache, input_ids=ids, position_ids=torch.arange(start, stop))
        s.cached.extend(context[start:stop])
        return hf.lm_head(self.model, hidden[-1:])[0]
