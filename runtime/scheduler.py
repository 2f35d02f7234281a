"""The round scheduler: the one place that knows the order of the steps of a session.

It alone owns the committed tokens (a :class:`~specmesh.runtime.session.Session`); workers hold only
state derivable from them (KV caches), told through each message's rollback position. Prefill is
simply the first round, whose context is the whole prompt. Target-only decoding is the same loop with
no draft (zero candidates per round): the baseline every speed figure compares with.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Iterator, Mapping, Sequence

import torch

from specmesh.policies.draft_length import RoundObservation
from specmesh.policies.split import SPLIT, verification_mode

from .interfaces import Backend, WorkerFailure
from .lockstep import RoundGate
from .messages import DraftProposal, OpenSession, ProposeRequest, SamplingParams
from .session import DRAFT, Session, stage_role
from .sparse import SparseDist
from .stats import RoundRecord
from .stop import StopRule
from .traffic import DOWNLINK, UPLINK, TrafficSnapshot
from .verdicts import check_verdict, completed

log = logging.getLogger(__name__)

# Stage failures one generation survives (each: replace the stage, replay the committed tokens);
# a stage that keeps failing is a broken deployment, not bad luck, and ends the generation.
MAX_STAGE_RECOVERIES = 3


class GenerationError(RuntimeError):
    """A generation failed part-way; nothing committed is lost.

    Attributes:
        output_ids: every token committed before the failure (already streamed to ``stream`` callers).
        session_id: the failed session.
    """

    def __init__(self, message: str, output_ids: list[int], session_id: str) -> None:
        super().__init__(f"{message} (after {len(output_ids)} committed tokens, kept in .output_ids)")
        self.output_ids = list(output_ids)
        self.session_id = session_id


class Generation:
    """One session's generation: iterate it to receive each round's new tokens.

    After iteration: ``output_ids`` (generated tokens), ``finish_reason`` and ``stats``. Closing the
    iterator early (``close()``, or a consumer that stops) frees the session on every worker.

    Args:
        backend: the wired workers.
        prompt_ids: the prompt's token ids.
        params: the session's sampling parameters.
        policy: the session's named policy map (acceptance, sparsifier and their options), sent to
            every worker when the session opens.
        stop: when the generation ends.
        draft_length: the session's draft-length policy object (``SpecConfig.draft_length_policy``).
        gamma: the first round's draft depth.
        session_id: a name for the session (random if None).
        tree_width: candidates per depth (1: a chain).
        overlap: draft the next round while this one is verified.
        on_finish: called with the generation once it has ended (finished, failed or closed).
        gate: the engine's :class:`~specmesh.runtime.lockstep.RoundGate`: every round after the
            first starts together with the other sessions' (None: free-running).
    """

    def __init__(
        self,
        backend: Backend,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        policy: Mapping[str, object],
        stop: StopRule,
        draft_length,
        gamma: int,
        session_id: str | None = None,
        tree_width: int = 1,
        overlap: bool = False,
        on_finish=None,
        gate: RoundGate | None = None,
    ) -> None:
        info = backend.info
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= info.max_positions:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {info.max_positions}"
            )
        bad = [t for t in prompt_ids if not 0 <= int(t) < info.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} outside the vocabulary [0, {info.vocab_size})")
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        if tree_width < 1:
            raise ValueError(f"tree_width must be >= 1, got {tree_width}")
        if verification_mode(policy) == SPLIT and tree_width > 1:
            raise ValueError(f"verification 'split' verifies chains only; tree_width must be 1, got {tree_width}")
        self.backend = backend
        self.params = params
        self.policy = dict(policy)
        self.stop = stop
        self.draft_length = draft_length
        self.session = Session(
            session_id or uuid.uuid4().hex[:16], [int(t) for t in prompt_ids], backend.num_stages, gamma
        )
        self._width = tree_width
        self._overlap = overlap
        self._on_finish = on_finish
        self._gate = gate
        self._opened: OpenSession | None = None
        self._recoveries = 0
        self._draft_down = False  # the draft failed: target-only rounds until it is back
        self._draft_back: threading.Thread | None = None
        self._draft_ok = False
        # How long the last verification took (round time less the draft's): speculation's budget.
        self._verify_ms: float | None = None

    @property
    def session_id(self) -> str:
        return self.session.session_id

    @property
    def prompt(self) -> list[int]:
        return self.session.prompt

    @property
    def output_ids(self) -> list[int]:
        return self.session.output

    @property
    def finish_reason(self) -> str | None:
        return self.session.finish_reason

    @property
    def stats(self):
        return self.session.stats

    def __iter__(self) -> Iterator[list[int]]:
        self._opened = OpenSession(self.session_id, self.params, self.policy)
        t_start = time.perf_counter()
        sid, gate = self.session_id, self._gate
        try:
            if gate is not None:
                gate.join(sid)
            self._open_everywhere()
            while self.session.finish_reason is None:
                prefill = self.session.round == 0  # never waits, and is no measure of a round
                if gate is not None and not prefill:
                    gate.arrive(sid)
                new = self._resilient_round()
                if gate is not None and not prefill:
                    gate.observe(self.stats.records[-1].wall_ms / 1e3)  # the round's own clock
                if gate is not None and self.session.finish_reason is not None:
                    gate.leave(sid)  # before the consumer sees the last tokens
                yield new
        except GeneratorExit:
            raise
        except Exception as exc:
            raise GenerationError(f"session {self.session_id} failed: {exc}", self.output_ids,
                                  self.session_id) from exc
        finally:
            self.stats.wall_s = time.perf_counter() - t_start
            if gate is not None:
                gate.leave(sid)
            self._cleanup()
            if self._on_finish is not None:
                self._on_finish(self)

    def _open_everywhere(self) -> None:
        """Opens the session on the target (replacing a stage found dead) and on the draft (a dead
        draft means target-only rounds until a new one is up)."""
        b = self.backend
        while True:
            try:
                b.target.open(self._opened)
                break
            except WorkerFailure as exc:
                if not self._recover(exc):
                    raise
        if b.drafter is not None and not self._draft_down:
            try:
                b.drafter.open(self._opened)
            except WorkerFailure as exc:
                if not self._recover(exc):
                    raise

    def _cleanup(self) -> None:
        """Reads the bytes and frees the session everywhere; each step on its own, so that one
        failing (a dead worker) neither skips the others nor hides the round's own error."""
        b, sid = self.backend, self.session_id
        steps = [
            ("count bytes", lambda: self._count_bytes(b.traffic.snapshot(sid))),
            ("forget bytes", lambda: b.traffic.forget(sid)),
            ("close the draft", lambda: self.stats.draft_counters.update(
                (b.drafter.close(sid) or {}) if b.drafter is not None else {})),
            ("close the stages", lambda: b.target.close(sid)),
        ]
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # cleaning up after a failure: log, never mask it
                log.warning("session %s: could not %s: %s", sid, what, exc)

    def _count_bytes(self, traffic: TrafficSnapshot) -> None:
        """This session's bytes: device links apart from the links between stages."""
        device = self.backend.device_links
        self.stats.bytes_up = traffic.total(UPLINK, device).bytes
        self.stats.bytes_down = traffic.total(DOWNLINK, device).bytes
        self.stats.bytes_between_stages = traffic.total().bytes - self.stats.bytes_up - self.stats.bytes_down
        self.stats.link_delay_ms = traffic.total().delay_ms
        self.stats.codec_ms = traffic.total().codec_ms

    def run(self) -> list[int]:
        """Runs to the end; returns the generated token ids."""
        for _ in self:
            pass
        return self.output_ids

    def _resilient_round(self) -> list[int]:
        """A round that survives failed workers: a failed stage is replaced and fed the committed
        tokens again; a failed draft leaves target-only rounds (slower, never wrong) until a new
        draft is up. Every draw is keyed by position, so a seeded output is what it would have been."""
        while True:
            self._maybe_draft_back()
            try:
                return self._round()
            except WorkerFailure as exc:
                if not self._recover(exc):
                    raise

    def _recover(self, exc: WorkerFailure) -> bool:
        b, s = self.backend, self.session
        role = exc.role or ""
        if role == DRAFT and b.drafter is not None and not self._draft_down:
            log.warning("session %s: %s; target-only rounds until a draft is back", s.session_id, exc)
            self._draft_down = True
            s.invalidate(DRAFT)
            self._draft_back = threading.Thread(target=self._revive_draft, daemon=True,
                                                name=f"specmesh-draft-{s.session_id}")
            self._draft_back.start()
            s.stats.recoveries.append(f"round {s.round}: draft failed, target-only")
            return True
        if not role.startswith("stage") or self._recoveries >= MAX_STAGE_RECOVERIES:
            return False
        self._recoveries += 1
        t0 = time.perf_counter()
        if not b.target.recover(role):
            return False
        b.target.open(self._opened)  # every stage starts the session afresh: replay from 0
        # (a stage failing here again fails this recovery: the loop above tries the next one)
        for k in range(b.num_stages):
            s.invalidate(stage_role(k))
        s.stats.recoveries.append(
            f"round {s.round}: {role} replaced in {time.perf_counter() - t0:.1f} s ({exc})")
        log.warning("session %s: %s replaced after: %s", s.session_id, role, exc)
        return True

    def _revive_draft(self) -> None:
        try:
            self._draft_ok = bool(self.backend.drafter.recover())
        except Exception as exc:  # the draft stays down; target-only rounds go on
            log.warning("session %s: the draft could not be brought back: %s", self.session_id, exc)

    def _maybe_draft_back(self) -> None:
        """Back to speculation once the replacement draft is up (it is sent every committed token)."""
        if not self._draft_down or self._draft_back is None or self._draft_back.is_alive():
            return
        self._draft_back = None
        if self._draft_ok:
            try:
                self.backend.drafter.open(self._opened)
            except WorkerFailure:
                return
            self._draft_down = False
            self.session.stats.recoveries.append(f"round {self.session.round}: draft back")

    def _round(self) -> list[int]:
        """One round: propose (or feed the context alone), verify, commit; returns the new tokens."""
        b, s = self.backend, self.session
        rnd = s.next_round()
        t0 = time.perf_counter()
        keep = s.target_keep
        committed = s.committed
        drafting = b.drafter is not None and not self._draft_down
        g = self._capped_gamma(s.gamma, len(committed)) if drafting else 0
        if drafting:
            told = s.positions["draft"]
            req = ProposeRequest(
                s.session_id, rnd, told, committed[told:], g, keep, self._width, s.prev_path,
                self.draft_length.stop_below,
            )
            s.told_draft()
            handle = b.drafter.propose(req)
            if self._overlap and g > 0:
                b.drafter.speculate(s.session_id, s.gamma, self._width, self._verify_ms)
        else:
            handle = DraftProposal(
                s.session_id, rnd, keep, committed[keep:],
                torch.zeros(0, dtype=torch.int64), SparseDist.empty(b.info.vocab_size),
            )
        result = b.target.verify(handle)
        if result.pending and drafting:  # split verification: the device draws the correction
            result = completed(result, b.drafter.resolve(result))
        drafted = check_verdict(result, s.session_id, rnd, g, self._width)
        base = len(committed)
        new, reason = self.stop.cut(s.output, list(result.tokens))
        if reason is None and base + len(new) >= b.info.max_positions:
            reason = "context"
        s.commit(new, result.accepted, base, result.path)
        s.finish_reason = reason
        wall_ms = (time.perf_counter() - t0) * 1e3
        record = RoundRecord(rnd, drafted, result.accepted, len(new), wall_ms, tuple(result.stage_ms),
                             result.draft_ms)
        # Per draft depth (a tree's mask is per candidate): depth d was accepted iff d < accepted.
        s.stats.add_round(record, [d < result.accepted for d in range(drafted)])
        if drafting:
            # Links and every overhead: what the round cost beyond the draft's and the stages' compute.
            verify_ms = sum(result.stage_ms)
            other_ms = max(0.0, wall_ms - result.draft_ms - verify_ms)
            self._verify_ms = wall_ms - result.draft_ms
            s.gamma = self.draft_length.next_gamma(RoundObservation(
                drafted=drafted, accepted=result.accepted, round_s=wall_ms / 1e3,
                draft_s_per_token=result.draft_ms / 1e3 / drafted if drafted else 0.0,
                verify_s=verify_ms / 1e3, link_s=other_ms / 1e3, uplink_bytes_per_position=0.0,
            ))
        return new

    def _capped_gamma(self, gamma: int, committed: int) -> int:
        # A round commits up to g + 1 tokens and feeds positions up to base + g - 1.
        left_new = self.stop.max_new_tokens - len(self.output_ids) - 1
        left_ctx = self.backend.info.max_positions - committed - 1
        return max(0, min(gamma, left_new, left_ctx))
