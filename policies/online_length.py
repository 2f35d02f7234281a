"""The ``online`` draft-length policy: climbs to the gamma with the highest measured tokens/s.

It assumes no model of acceptance or cost. Its objective is the long-run throughput of rounds of
``g`` drafts, ``E[tokens | g] / E[round_s | g]`` (tokens = accepted + 1), estimated from two measured
quantities:

- ``E[round_s | g]``: the discounted mean wall time of the rounds that drafted ``g`` tokens;
- ``E[tokens | g] = 1 + sum_{j <= g} P(the first j drafts are kept)``, from the discounted counts of
  how often depth ``j`` was reached and rejected, over every round whatever its length (a round of
  ``g`` drafts tests depths ``1..min(accepted + 1, g)``). Whether the first ``j`` drafts are kept does
  not depend on how many more were drafted, so every round informs every shorter length: the token
  estimate of a neighbouring gamma is nearly as tight as the incumbent's, and the climb does not
  wander on the noise of the accepted counts (a geometric count has a spread near its mean).

The climb alone moves one step per probe, too slow for a session of a few dozen rounds. So it also
fits the round time as affine in gamma, ``round_s ~ a + b g`` (discounted least squares over every
round: drafting costs per token, the rest per round), and, where ``E[tokens | g] / (a + b g)``
(untested depths kept at the pooled per-depth rate) promises more than ``online_jump_gain`` (5%)
over the incumbent's measured rate at a gamma beyond its neighbours, jumps there; the measured
climb then settles the last step, so the fit need not be exact.

Each round plays the incumbent gamma, except that every ``online_probe_every``-th round tries a
neighbour (alternately ``gamma + 1`` and ``gamma - 1``, the incumbent where that is out of range); after every round the incumbent moves to the
best of itself and its measured neighbours. Throughput is unimodal in gamma for the usual processes
(see :mod:`.tkslt`), so the climb ends at the best static gamma and then keeps probing, which lets it
follow a change of link or content; the cost of probing at the top is small because there the
neighbours are nearly as fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .draft_length import DRAFT_LENGTH, PREFILL_ROUNDS, RoundObservation, read_max_gamma
from .options import Options, read_float, read_int

MIN_ROUNDS = 2.0  # discounted rounds a gamma needs before its wall time is trusted


@dataclass
class OnlineLength:
    """Hill-climbs gamma on measured tokens/s (see the module docstring).

    Attributes:
        gamma: the incumbent draft length (starts at the session's gamma).
        max_gamma: the largest gamma tried.
        decay: per-round weight of the past in every estimate (window ~ 1 / (1 - decay) rounds).
        probe_every: every n-th round tries a neighbour of the incumbent.
    """

    gamma: int
    max_gamma: int
    decay: float = 0.98
    probe_every: int = 4
    jump_gain: float = 0.05
    stop_below: float | None = None
    _reach: list[float] = field(init=False)  # [max_gamma + 1] depth j was tested (index j, from 1)
    _reject: list[float] = field(init=False)  # [max_gamma + 1] depth j was tested and rejected
    _time: dict[int, float] = field(default_factory=dict, init=False)  # gamma -> discounted seconds
    _rounds: dict[int, float] = field(default_factory=dict, init=False)  # gamma -> discounted rounds
    _fit: list[float] = field(default_factory=lambda: [0.0] * 5, init=False)  # sums w, g, g^2, t, g t
    _seen: int = field(default=0, init=False)
    _probe_up: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.gamma <= self.max_gamma:
            raise ValueError(f"gamma = {self.gamma}: must be in [1, max_gamma = {self.max_gamma}]")
        self._reach = [0.0] * (self.max_gamma + 1)
        self._reject = [0.0] * (self.max_gamma + 1)

    @classmethod
    def from_options(cls, gamma: int, options: Options) -> "OnlineLength":
        """Reads ``max_gamma``, ``online_decay`` (default 0.98) and ``online_probe_every`` (4)."""
        cap = read_max_gamma(options)
        return cls(
            min(gamma, cap), cap,
            decay=read_float(options, "online_decay", 0.98, 0.0, 0.9999),
            probe_every=read_int(options, "online_probe_every", 4, 2, 1000),
            jump_gain=read_float(options, "online_jump_gain", 0.05, 0.0, 10.0),
        )

    def expected_tokens(self, gamma: int, pooled: bool = False) -> float:
        """Estimated mean tokens committed by a round of ``gamma`` drafts. ``pooled``: a depth
        tested fewer than once counts at the pooled per-depth rate (else as a coin flip)."""
        total, keep = 1.0, 1.0
        prior = self.pooled_keep() if pooled else None
        for j in range(1, gamma + 1):
            if prior is not None and self._reach[j] < 1.0:
                keep *= prior
            else:  # half a rejection in one test as a prior: an untested depth counts as a coin flip
                keep *= 1.0 - (self._reject[j] + 0.5) / (self._reach[j] + 1.0)
            total += keep
        return total

    def pooled_keep(self) -> float:
        """The discounted share of tested depths that were kept, over every depth (0.5 untested)."""
        reach = sum(self._reach)
        return 1.0 - (sum(self._reject) + 0.5) / (reach + 1.0)

    def affine_time(self) -> tuple[float, float] | None:
        """``(a, b)`` of the fitted ``round_s ~ a + b * gamma`` (None until two gammas were played)."""
        w, sg, sgg, st, sgt = self._fit
        det = w * sgg - sg * sg
        if w < 2 * MIN_ROUNDS or det <= 1e-6 * w * w:
            return None
        b = max(0.0, (w * sgt - sg * st) / det)
        a = max(1e-6, (st - b * sg) / w)
        return a, b

    def modelled_rate(self, gamma: int) -> float | None:
        """``E[tokens | gamma] / (a + b gamma)`` from the fit (None without one)."""
        fit = self.affine_time()
        return None if fit is None else self.expected_tokens(gamma, pooled=True) / (fit[0] + fit[1] * gamma)

    def rate(self, gamma: int) -> float | None:
        """Estimated tokens/s of rounds of ``gamma`` drafts (None until measured ``MIN_ROUNDS`` times)."""
        if self._rounds.get(gamma, 0.0) < MIN_ROUNDS or self._time[gamma] <= 0:
            return None
        return self.expected_tokens(gamma) * self._rounds[gamma] / self._time[gamma]

    def next_gamma(self, obs: RoundObservation) -> int:
        self._seen += 1
        if self._seen > PREFILL_ROUNDS and 0 < obs.drafted <= self.max_gamma:
            self._observe(obs)
            self._climb()
        return self._plan()

    def _observe(self, obs: RoundObservation) -> None:
        d, g, k = self.decay, obs.drafted, obs.accepted
        self._reach = [d * r for r in self._reach]
        self._reject = [d * r for r in self._reject]
        for j in range(1, min(k + 1, g) + 1):
            self._reach[j] += 1.0
        if k < g:
            self._reject[k + 1] += 1.0
        for arm in self._rounds:
            self._rounds[arm] *= d
            self._time[arm] *= d
        self._rounds[g] = self._rounds.get(g, 0.0) + 1.0
        self._time[g] = self._time.get(g, 0.0) + obs.round_s
        t = obs.round_s
        self._fit = [d * x for x in self._fit]
        for i, v in enumerate((1.0, g, g * g, t, g * t)):
            self._fit[i] += v

    def _climb(self) -> None:
        best, best_rate = self.gamma, self.rate(self.gamma)
        for arm in (self.gamma - 1, self.gamma + 1):
            r = self.rate(arm) if 1 <= arm <= self.max_gamma else None
            if r is not None and (best_rate is None or r > best_rate):
                best, best_rate = arm, r
        self.gamma = best
        if best_rate is None:
            return
        far = [g for g in range(1, self.max_gamma + 1) if abs(g - best) > 1]
        scored = [(self.modelled_rate(g), g) for g in far]
        top = max((x for x in scored if x[0] is not None), default=None)
        if top is not None and top[0] > (1.0 + self.jump_gain) * best_rate:
            self.gamma = top[1]  # the fit promises more beyond the neighbours: go and measure it

    def _plan(self) -> int:
        if self._seen % self.probe_every:
            return self.gamma
        # Each side in turn; at an end of [1, max_gamma] its turn plays the incumbent, so a
        # neighbour is probed once in 2 * probe_every rounds wherever the incumbent is.
        self._probe_up = not self._probe_up
        arm = self.gamma + 1 if self._probe_up else self.gamma - 1
        return arm if 1 <= arm <= self.max_gamma else self.gamma


DRAFT_LENGTH.register("online")(OnlineLength.from_options)
