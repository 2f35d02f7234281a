"""Lockstep rounds: the concurrent sessions of one engine start their rounds together.

Batched rounds (``runtime/batching.py``) share a forward among the sessions that reach a worker at
the same moment. Left alone, sessions drift apart: a draft of several depths, two stages and the
links each hold some of them at any time, one straggler splits a batch in two, and a stage sees two
or three sessions at once instead of sixteen. The gate puts them back in step once per round, as an
engine iteration of vLLM does: every session waits at the start of its round until every other
session of the gate has arrived too, then all go at once, draft depths and stages batched together.

A session that does not come (its consumer reads a stream slowly, it is replaying after a failure)
must not stall the others: the gate waits at most ``patience`` times the last rounds' wall time
(capped at :data:`MAX_WAIT_S`) after the first arrival; whoever has not arrived then joins the next
cycle. A session's first round (its prefill: the whole prompt) does not wait: it is long and would
pad everyone's forward to its length.
"""
from __future__ import annotations

import threading
import time
from typing import Hashable

MAX_WAIT_S = 2.0  # the longest a session waits at the gate for the others
EMA = 0.3  # weight of the newest round time in the gate's estimate


class RoundGate:
    """A cyclic barrier with members that come and go.

    Args:
        patience: how long arrived sessions wait for the rest, in units of the recent round wall
            time (0: never wait; the gate is then a no-op).

    Thread-safe: each member calls from its own thread (a session's generation).
    """

    def __init__(self, patience: float = 1.0) -> None:
        if not patience >= 0:
            raise ValueError(f"patience must be >= 0, got {patience!r}")
        self.patience = patience
        self._cond = threading.Condition()
        self._members: set[Hashable] = set()
        self._arrived: set[Hashable] = set()
        self._cycle = 0  # which cycle is gathering
        self._first_at: float | None = None  # when the gathering cycle's first member arrived
        self._round_s = 0.0  # moving estimate of a round's wall time
        self._released = 0  # cycles released, for stats
        self._sessions = 0  # members released, summed over the cycles
        self._members_sum = 0  # members at each release, summed (those that missed it included)

    def join(self, member: Hashable) -> None:
        """``member`` takes part from its next :meth:`arrive` on (after its prefill)."""
        with self._cond:
            self._members.add(member)

    def leave(self, member: Hashable) -> None:
        """``member`` is done: the others no longer wait for it (it may complete their cycle)."""
        with self._cond:
            self._members.discard(member)
            self._arrived.discard(member)
            self._maybe_release()

    def observe(self, round_s: float) -> None:
        """A member's round took ``round_s`` seconds: the gate's patience scales with it."""
        with self._cond:
            self._round_s = round_s if self._round_s == 0 else (1 - EMA) * self._round_s + EMA * round_s

    def arrive(self, member: Hashable) -> None:
        """Blocks until every member has arrived at this cycle, or the patience has run out since
        the first arrival; then every arrived member goes. A non-member returns at once."""
        with self._cond:
            if member not in self._members or self.patience <= 0:
                return
            cycle = self._cycle
            self._arrived.add(member)
            if self._first_at is None:
                self._first_at = time.monotonic()
            self._maybe_release()
            while self._cycle == cycle:
                left = self._first_at + self._wait_s() - time.monotonic()
                if left <= 0:
                    self._release()
                    break
                self._cond.wait(left)

    def stats(self) -> dict[str, int]:
        """Cycles released so far (``cycles``), the sessions they released (``sessions``, summed)
        and the members at each release (``members``, summed): sessions / cycles is the mean
        number of sessions that started a round together, sessions / members how many of those
        in flight made it (1.0: perfect lockstep)."""
        with self._cond:
            return {"cycles": self._released, "sessions": self._sessions, "members": self._members_sum}

    def _wait_s(self) -> float:
        return min(MAX_WAIT_S, self.patience * self._round_s) if self._round_s > 0 else MAX_WAIT_S

    def _maybe_release(self) -> None:
        if self._arrived and self._arrived >= self._members:
            self._release()

    def _release(self) -> None:
        self._sessions += len(self._arrived)
        self._members_sum += len(self._members | self._arrived)
        self._released += 1
        self._arrived.clear()
        self._first_at = None
        self._cycle += 1
        self._cond.notify_all()
