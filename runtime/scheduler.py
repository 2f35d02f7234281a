"""The round scheduler: the one place that knows the order of the steps of a session.

It alone owns the committed tokens; workers hold only state derivable from them (KV caches), told
through each message's rollback position. Prefill is simply the first round, whose context is the
whole prompt. Target-only decoding is the same loop with no draft (zero candidates per round): the
baseline every speed figure compares with.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from specmesh.policies import draft_length

from .interfaces import Backend
from .messages import DraftProposal, OpenSession, ProposeRequest, SamplingParams, VerifyResult
from .sparse import SparseDist
from .stats import RoundRecord, SessionStats
from .traffic import DOWNLINK, UPLINK, TrafficSnapshot

# Tokens decoded around each new token when looking for a stop string.
_STOP_WINDOW = 16


@dataclass(frozen=True)
class StopRule:
    """When a generation ends.

    Attributes:
        max_new_tokens: at most this many generated tokens.
        eos_token_ids: generation ends after any of these (the token is kept).
        stop_strings: generation ends after the token that completes any of these.
        decode: token ids -> text; required when ``stop_strings`` is non-empty.
    """

    max_new_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.stop_strings and self.decode is None:
            raise ValueError("stop strings need a tokenizer to decode with; this model has none")

    def cut(self, generated: list[int], new: list[int]) -> tuple[list[int], str | None]:
        """Returns the part of ``new`` to keep and the finish reason if generation ends."""
        for i, tok in enumerate(new):
            if tok in self.eos_token_ids:
                return new[: i + 1], "eos"
            if self.stop_strings:
                upto = generated + new[: i + 1]
                text = self.decode(upto[-_STOP_WINDOW:])
                if any(s in text for s in self.stop_strings):
                    return new[: i + 1], "stop"
            if len(generated) + i + 1 >= self.max_new_tokens:
                return new[: i + 1], "length"
        return new, None


class Generation:
    """One session's generation: iterate it to receive each round's new tokens.

    After iteration: ``output_ids`` (generated tokens), ``finish_reason`` and ``stats``.
    """

    def __init__(
        self,
        backend: Backend,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stop: StopRule,
        gamma: int,
        draft_length_policy: str = "fixed",
        session_id: str | None = None,
        tree_width: int = 1,
        overlap: bool = False,
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
        self.backend = backend
        self.prompt = [int(t) for t in prompt_ids]
        self.params = params
        self.stop = stop
        self.policy = draft_length.make(draft_length_policy, gamma)
        self.session_id = session_id or uuid.uuid4().hex[:16]
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stats = SessionStats(prompt_tokens=len(self.prompt))
        self._gamma = gamma
        if tree_width < 1:
            raise ValueError(f"tree_width must be >= 1, got {tree_width}")
        self._width = tree_width
        self._overlap = overlap

    def __iter__(self) -> Iterator[list[int]]:
        b = self.backend
        workers = [w for w in (b.drafter, b.target) if w is not None]
        opened = OpenSession(self.session_id, self.params)
        t_start = time.perf_counter()
        try:
            for w in workers:
                w.open(opened)
            yield from self._rounds()
        finally:
            self.stats.wall_s = time.perf_counter() - t_start
            self._count_bytes(b.traffic.snapshot(self.session_id))
            b.traffic.forget(self.session_id)
            if b.drafter is not None:
                self.stats.draft_counters = b.drafter.close(self.session_id) or {}
            b.target.close(self.session_id)

    def _count_bytes(self, traffic: TrafficSnapshot) -> None:
        """This session's bytes: device links apart from the links between stages."""
        device = self.backend.device_links
        self.stats.bytes_up = traffic.total(UPLINK, device).bytes
        self.stats.bytes_down = traffic.total(DOWNLINK, device).bytes
        self.stats.bytes_between_stages = traffic.total().bytes - self.stats.bytes_up - self.stats.bytes_down

    def run(self) -> list[int]:
        """Runs to the end; returns the generated token ids."""
        for _ in self:
            pass
        return self.output_ids

    def _rounds(self) -> Iterator[list[int]]:
        b = self.backend
        committed = list(self.prompt)
        target_keep = 0  # target cache positions still valid
        draft_told = 0  # committed tokens the draft has been told
        gamma = self._gamma
        prev_path: list[int] = []
        rnd = 0
        while self.finish_reason is None:
            rnd += 1
            t0 = time.perf_counter()
            g = self._capped_gamma(gamma, len(committed)) if b.drafter is not None else 0
            if b.drafter is not None:
                req = ProposeRequest(
                    self.session_id, rnd, draft_told, committed[draft_told:], g, target_keep,
                    self._width, prev_path,
                )
                draft_told = len(committed)
                handle = b.drafter.propose(req)
                if self._overlap and g > 0:
                    b.drafter.speculate(self.session_id, gamma)
            else:
                handle = DraftProposal(
                    self.session_id, rnd, target_keep, committed[target_keep:],
                    torch.zeros(0, dtype=torch.int64), SparseDist.empty(b.info.vocab_size),
                )
            result = b.target.verify(handle)
            self._check(result, rnd, g)
            base = len(committed)
            target_keep = base + result.accepted
            prev_path = list(result.path)
            new, self.finish_reason = self.stop.cut(self.output_ids, list(result.tokens))
            if self.finish_reason is None and base + len(new) >= b.info.max_positions:
                self.finish_reason = "context"
            committed.extend(new)
            self.output_ids.extend(new)
            record = RoundRecord(
                rnd, g, result.accepted, len(new), (time.perf_counter() - t0) * 1e3,
                tuple(result.stage_ms),
            )
            # Per draft depth (a tree's mask is per candidate): depth d was accepted iff d < accepted.
            self.stats.add_round(record, [d < result.accepted for d in range(g)])
            gamma = self.policy.next_gamma(result.accepted, g) if g else gamma
            yield new

    def _capped_gamma(self, gamma: int, committed: int) -> int:
        # A round commits up to g + 1 tokens and feeds positions up to base + g - 1.
        left_new = self.stop.max_new_tokens - len(self.output_ids) - 1
        left_ctx = self.backend.info.max_positions - committed - 1
        return max(0, min(gamma, left_new, left_ctx))

    def _check(self, result: VerifyResult, rnd: int, gamma: int) -> None:
        if result.session_id != self.session_id or result.round != rnd:
            raise RuntimeError(
                f"verdict for session {result.session_id} round {result.round} while waiting for "
                f"{self.session_id} round {rnd}"
            )
        if not 0 <= result.accepted <= gamma or len(result.tokens) != result.accepted + 1 \
                or (result.path and len(result.path) != result.accepted):
            raise RuntimeError(f"malformed verdict: accepted {result.accepted} of {gamma}, tokens {result.tokens}")
