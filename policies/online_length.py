"""The ``online`` draft-length policy: plays the gamma with the highest estimated tokens/s.

It assumes no model of acceptance. Its objective is the long-run throughput of rounds of ``g``
drafts, ``E[tokens | g] / E[round_s | g]`` (tokens = accepted + 1), estimated from what the rounds
measured, every estimate discounted by ``decay`` per round:

- ``E[tokens | g] = 1 + sum_{j <= g} prod_{i <= j} keep_i``, ``keep_i`` the share of the rounds that
  reached depth ``i`` and kept it (a round of ``g`` drafts tests depths ``1..min(accepted + 1, g)``),
  over every round whatever its length: whether the first ``j`` drafts are kept does not depend on
  how many more were drafted. Each depth's share is shrunk toward the pooled share of every depth
  (``DEPTH_PRIOR`` tests' worth), so a depth seldom or never reached counts at the pooled rate. A
  coin-flip prior per depth (the earlier estimate) made every untested depth look bad and held gamma
  low: the deep depths are only ever reached by the longer rounds the controller is deciding whether
  to play, and a depth reached in two rounds of three was still shrunk a third of the way to 0.5.
- ``E[round_s | g]``: the arm's own mean wall time, shrunk toward a model with the weight of
  ``ARM_PRIOR`` rounds: an arm played often is judged on its own time, one never played on the
  model. The model is ``a + b g`` with ``b`` = the measured draft time per drafted position plus the
  slope, and ``a`` the intercept, of a discounted least-squares fit of the rest of the round (wall
  minus draft compute: verification, links, overhead) on ``g``, that slope shrunk toward 0
  (:class:`~.tkslt.DiscountedFit`). Fitting the whole round time on ``g`` instead learnt its slope from the
  spread of gamma alone, which the probes keep small: one stalled round at a far gamma set the slope
  for the rest of the session (measured on the bundled pair: twice the real one, and the controller
  settled at gamma 4 of a best 8-10). A round slower than ``CLIP`` times its prediction counts as
  ``CLIP`` times it: the 2-core machine stalls now and then, a property of the moment, not of ``g``.

After every round the incumbent moves to the gamma of highest estimated rate where that promises
more than ``online_jump_gain`` (2%) over the incumbent's, within a trust region of half the smallest
to twice the largest gamma measured (the affine fit is not trusted far from its data). Every
``online_probe_every``-th round plays ``gamma + delta`` and ``gamma - delta`` in turn, ``delta =
max(1, round(gamma / 4))``: the spread the slope is learned from, and a measurement of the arms
around the incumbent (near the optimum they are nearly as fast, so probing costs little). Throughput
is unimodal in gamma for the usual processes (see :mod:`.tkslt`).

An engine carries the learned estimates from one session to the next (:meth:`OnlineLength.resumed`):
a session is a few dozen rounds, too few to learn the rates from scratch each time.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .draft_length import DRAFT_LENGTH, PREFILL_ROUNDS, RoundObservation, read_max_gamma
from .options import Options, read_float, read_int
from .tkslt import DiscountedFit

DEPTH_PRIOR = 10.0  # tests' worth of the pooled rate in a depth's keep estimate
ARM_PRIOR = 4.0  # rounds' worth of the affine fit in an arm's time estimate
CLIP = 1.5  # a round's time counts at most this many times its prediction (~5% of rounds on 2 cores)
MIN_ROUNDS = 1.0  # discounted rounds measured (after the prefill) before the incumbent moves
PROBE_SHARE = 4  # the probe step is gamma / PROBE_SHARE (at least 1)


@dataclass
class OnlineLength:
    """Plays the gamma of highest estimated tokens/s (see the module docstring).

    Attributes:
        gamma: the incumbent draft length (starts at the session's gamma).
        max_gamma: the largest gamma tried.
        decay: per-round weight of the past in every estimate (window ~ 1 / (1 - decay) rounds).
        probe_every: every n-th round of a session tries an arm around the incumbent.
        jump_gain: the incumbent moves where the estimates promise more than this share over it.
    """

    gamma: int
    max_gamma: int
    decay: float = 0.98
    probe_every: int = 4
    jump_gain: float = 0.02
    stop_below: float | None = None
    _reach: list[float] = field(init=False)  # [max_gamma + 1] depth j was tested (index j, from 1)
    _reject: list[float] = field(init=False)  # [max_gamma + 1] depth j was tested and rejected
    _time: list[float] = field(init=False)  # [max_gamma + 1] gamma -> discounted seconds
    _rounds: list[float] = field(init=False)  # [max_gamma + 1] gamma -> discounted rounds
    _fit: DiscountedFit = field(init=False)  # the rest of the round (wall minus draft compute) on gamma
    _draft: list[float] = field(default_factory=lambda: [0.0, 0.0], init=False)  # sums drafted, draft s
    _seen: int = field(default=0, init=False)  # rounds of this session
    _probe_up: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.gamma <= self.max_gamma:
            raise ValueError(f"gamma = {self.gamma}: must be in [1, max_gamma = {self.max_gamma}]")
        n = self.max_gamma + 1
        self._reach, self._reject = [0.0] * n, [0.0] * n
        self._time, self._rounds = [0.0] * n, [0.0] * n
        self._fit = DiscountedFit(self.decay)

    @classmethod
    def from_options(cls, gamma: int, options: Options) -> "OnlineLength":
        """Reads ``max_gamma``, ``online_decay`` (0.98), ``online_probe_every`` (4), ``online_jump_gain`` (0.02)."""
        cap = read_max_gamma(options)
        return cls(
            min(gamma, cap), cap,
            decay=read_float(options, "online_decay", 0.98, 0.0, 0.9999),
            probe_every=read_int(options, "online_probe_every", 4, 2, 1000),
            jump_gain=read_float(options, "online_jump_gain", 0.02, 0.0, 10.0),
        )

    def resumed(self) -> "OnlineLength":
        """A policy for the engine's next session: this one's estimates and incumbent, a fresh
        session count (its first round, the prefill, is skipped again)."""
        nxt = copy.deepcopy(self)
        nxt._seen, nxt._probe_up = 0, True
        return nxt

    def keep(self) -> list[float]:
        """``[max_gamma + 1]``: the estimated probability that depth ``j`` is kept given that every
        shallower one was (index 0 unused), each shrunk toward the pooled rate of every depth."""
        reach = sum(self._reach)
        pooled = (reach - sum(self._reject) + 0.5) / (reach + 1.0)  # a coin flip before any test
        return [1.0] + [(self._reach[j] - self._reject[j] + DEPTH_PRIOR * pooled) / (self._reach[j] + DEPTH_PRIOR)
                        for j in range(1, self.max_gamma + 1)]

    def expected_tokens(self, gamma: int) -> float:
        """Estimated mean tokens committed by a round of ``gamma`` drafts."""
        keep = self.keep()
        total, chain = 1.0, 1.0
        for j in range(1, gamma + 1):
            chain *= keep[j]
            total += chain
        return total

    def draft_per_token(self) -> float:
        """The discounted mean draft compute per drafted position, seconds (0 if never reported)."""
        return self._draft[1] / self._draft[0] if self._draft[0] > 0 else 0.0

    def affine_time(self) -> tuple[float, float] | None:
        """``(a, b)`` of the modelled ``round_s ~ a + b * gamma`` (None before a round was measured)."""
        if self._fit.w < 0.5:
            return None
        a, slope = self._fit.fit()  # of the rest of the round
        return max(a, 1e-6), max(0.0, self.draft_per_token() + slope)

    def expected_time(self, gamma: int) -> float | None:
        """Estimated mean seconds of a round of ``gamma`` drafts (None before a round was measured)."""
        fit = self.affine_time()
        if fit is None:
            return None
        modelled = fit[0] + fit[1] * gamma
        n = self._rounds[gamma]
        return (self._time[gamma] + ARM_PRIOR * modelled) / (n + ARM_PRIOR)

    def rate(self, gamma: int) -> float | None:
        """Estimated tokens/s of rounds of ``gamma`` drafts (None before a round was measured)."""
        t = self.expected_time(gamma)
        return None if t is None or t <= 0 else self.expected_tokens(gamma) / t

    def next_gamma(self, obs: RoundObservation) -> int:
        self._seen += 1
        if self._seen > PREFILL_ROUNDS and 0 < obs.drafted <= self.max_gamma:
            self._observe(obs)
            self._choose()
        return self._plan()

    def _observe(self, obs: RoundObservation) -> None:
        d, g, k = self.decay, obs.drafted, obs.accepted
        predicted = self.expected_time(g)
        t = obs.round_s if predicted is None else min(obs.round_s, CLIP * predicted)
        self._reach = [d * r for r in self._reach]
        self._reject = [d * r for r in self._reject]
        for j in range(1, min(k + 1, g) + 1):
            self._reach[j] += 1.0
        if k < g:
            self._reject[k + 1] += 1.0
        self._rounds = [d * r for r in self._rounds]
        self._time = [d * r for r in self._time]
        self._rounds[g] += 1.0
        self._time[g] += t
        draft_s = g * obs.draft_s_per_token
        rest = max(0.0, t - draft_s)
        self._fit.add(g, rest)
        self._draft = [d * self._draft[0] + g, d * self._draft[1] + draft_s]

    def _choose(self) -> None:
        played = [g for g in range(1, self.max_gamma + 1) if self._rounds[g] >= 0.5]
        if self._fit.w < MIN_ROUNDS:
            return
        lo, hi = max(1, min(played) // 2), min(self.max_gamma, 2 * max(played))
        mine = self.rate(self.gamma)
        best, best_rate = self.gamma, mine
        for g in range(lo, hi + 1):
            r = self.rate(g)
            if r is not None and (best_rate is None or r > best_rate):
                best, best_rate = g, r
        if mine is None or best_rate > (1.0 + self.jump_gain) * mine:
            self.gamma = best

    def _plan(self) -> int:
        if self._seen % self.probe_every:
            return self.gamma
        self._probe_up = not self._probe_up
        step = max(1, round(self.gamma / PROBE_SHARE))
        arm = self.gamma + step if self._probe_up else self.gamma - step
        return min(max(arm, 1), self.max_gamma)


DRAFT_LENGTH.register("online")(OnlineLength.from_options)
