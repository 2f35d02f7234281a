"""TK-SLT's optimal draft length in closed form (Zheng, Yang; arXiv:2509.04576).

A round of ``gamma`` drafted tokens costs ``a * gamma + b`` seconds: ``a`` per drafted position (draft
compute plus that position's uplink bytes over the link), ``b`` per round (verification compute and
the link latencies). It commits ``E[tokens] = (1 - alpha^(gamma+1)) / (1 - alpha)`` tokens on average
(per-token acceptance ``alpha``), so the throughput is

    f(gamma) = (1 - alpha^(gamma+1)) / ((1 - alpha) * (a * gamma + b)).

Writing ``n = gamma + 1`` and ``c = (b - a) / a``, ``df/dn = 0`` reads ``alpha^n (1 + (n + c) lam) = 1``
with ``lam = -ln alpha``; the substitution ``z = 1 + (n + c) lam`` turns it into
``z e^-z = alpha^c / e``, whose root above 1 is ``z = -W_{-1}(-alpha^c / e)`` (lower branch), so

    gamma* + 1 = (z - 1) / (-ln alpha) - c.

``f`` is unimodal in ``gamma`` (``df/dn`` has the sign of ``alpha^n z - 1``, which falls with ``n``),
so the integer optimum is the better of the two integers around the root; for ``b <= a`` (``c <= 0``) ``f`` only falls and the
optimum is the smallest length. The paper's normalised form (costs in units of one target step,
``L = (T_draft + uplink time of one token's sparse q) / T_target``) is the case ``a = L, b = 1``:
``gamma0 = (W_{-1}(-alpha^(1/L - 1) / e) + 1) / ln(alpha) - 1/L``, and speculation is worth it only
where ``S(gamma*) = f(gamma*) / f(0) > 1`` (Table I's starred cells are where it is not).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from scipy.special import lambertw, wrightomega

from .draft_length import DRAFT_LENGTH, PREFILL_ROUNDS, RoundObservation, read_max_gamma
from .options import Options, read_float


def expected_tokens(alpha: float, gamma: int) -> float:
    """Mean tokens committed by a round of ``gamma`` drafts (accepted ones plus the correction/bonus)."""
    _check_alpha(alpha, closed=True)
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def throughput(alpha: float, gamma: int, a: float, b: float) -> float:
    """Tokens per second of rounds of ``gamma`` drafts costing ``a * gamma + b`` seconds each."""
    return expected_tokens(alpha, gamma) / (a * gamma + b)


def continuous_optimum(alpha: float, a: float, b: float) -> float:
    """The real ``gamma`` maximising :func:`throughput` (may be < 1 or ``inf`` for ``alpha -> 1``).

    Args:
        alpha: per-token acceptance probability in (0, 1).
        a: cost per drafted position (> 0), seconds or any unit shared with ``b``.
        b: cost per round (> 0).
    """
    _check_alpha(alpha, closed=False)
    _check_costs(a, b)
    c = (b - a) / a
    if c <= 0:
        return 0.0  # f decreases from gamma = 0 on
    log_arg = c * math.log(alpha) - 1.0  # ln(alpha^c / e) <= -1
    if log_arg > -1.0 - 1e-12:
        z = 1.0  # at the branch point W_{-1}(-1/e) = -1 (lambertw returns nan a rounding below it)
    elif log_arg > -600.0:
        z = -lambertw(-math.exp(log_arg), k=-1).real
    else:
        # -alpha^c / e underflows a double: W_{-1}(x) = omega(ln(-x) - i pi) (Wright omega), in logs.
        z = -wrightomega(complex(log_arg, -math.pi)).real
    return (z - 1.0) / -math.log(alpha) - c - 1.0


def optimal_gamma(alpha: float, a: float, b: float, max_gamma: int, min_gamma: int = 1) -> int:
    """The integer ``gamma`` in ``[min_gamma, max_gamma]`` with the highest :func:`throughput`."""
    if not 0 <= min_gamma <= max_gamma:
        raise ValueError(f"need 0 <= min_gamma <= max_gamma, got {min_gamma} and {max_gamma}")
    x = continuous_optimum(alpha, a, b)
    if not math.isfinite(x) or x >= max_gamma:
        return max_gamma
    lo = min(max(math.floor(x), min_gamma), max_gamma)
    hi = min(lo + 1, max_gamma)
    return hi if throughput(alpha, hi, a, b) > throughput(alpha, lo, a, b) else lo


def paper_speedup(alpha: float, gamma: int, L: float) -> float:
    """The paper's ``S(gamma) = (1 - alpha^(gamma+1)) / ((1 - alpha)(1 + gamma L))`` (eq. 11)."""
    return throughput(alpha, gamma, L, 1.0)


def paper_optimal_gamma(alpha: float, L: float, max_gamma: int = 10_000) -> tuple[int, bool]:
    """The paper's ``gamma*`` (eq. 21) and whether speculating beats the target alone (``S > 1``).

    Args:
        alpha: per-token acceptance probability in (0, 1).
        L: ``(T_draft + uplink time of one token's sparse q) / T_target`` (> 0).
        max_gamma: cap on the search (the closed form is unbounded as ``alpha -> 1``).
    Returns:
        ``(gamma*, worthwhile)``: ``gamma* >= 1``; ``worthwhile`` is False where the paper falls back
        to decoding with the target alone (``S(gamma*) <= 1``, the starred cells of Table I).
    """
    gamma = optimal_gamma(alpha, L, 1.0, max_gamma)
    # Two cells of Table I are exact ties, S(1) = 1 (alpha 0.4, L 0.4 and alpha 0.6, L 0.6); the
    # table stars one and not the other, which is float rounding. Here a tie falls back (S <= 1).
    return gamma, paper_speedup(alpha, gamma, L) > 1.0 + 1e-12


def _check_alpha(alpha: float, closed: bool) -> None:
    ok = 0.0 <= alpha <= 1.0 if closed else 0.0 < alpha < 1.0
    if not (ok and math.isfinite(alpha)):
        raise ValueError(f"alpha = {alpha!r}: must be in {'[0, 1]' if closed else '(0, 1)'}")


def _check_costs(a: float, b: float) -> None:
    if not (a > 0 and math.isfinite(a)) or not (b > 0 and math.isfinite(b)):
        raise ValueError(f"costs a = {a!r} (per drafted position) and b = {b!r} (per round) must be > 0")


SLOPE_SD = 0.05  # a priori spread of a fit's slope around its prior: 2% of the mean y per unit of x


@dataclass
class DiscountedFit:
    """Exponentially discounted least squares of ``y`` on ``x`` (one regressor and an intercept)."""

    decay: float
    w: float = 0.0
    sx: float = 0.0
    sxx: float = 0.0
    sy: float = 0.0
    sxy: float = 0.0
    syy: float = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.w, self.sx, self.sxx = d * self.w + 1, d * self.sx + x, d * self.sxx + x * x
        self.sy, self.sxy, self.syy = d * self.sy + y, d * self.sxy + x * y, d * self.syy + y * y

    def fit(self, prior_slope: float = 0.0) -> tuple[float, float]:
        """``(intercept, slope)``, the slope the posterior mean under a normal prior around
        ``prior_slope`` of sd ``SLOPE_SD * |mean y|`` and noise of the variance of ``y``: a ridge of
        ``var(y) / prior sd^2`` (discounted rounds times x squared). Under a 2% noise the data
        overrides the prior within a few rounds; under the 20% of a shared 2-core machine, rounds of
        gammas within one or two of each other teach a slope slowly, and one stalled round at the far
        end no longer sets it (it did: on the bundled pair, a slope twice the real one, and gamma 4 of
        a best 8-10)."""
        if self.w <= 0:
            return 0.0, prior_slope
        mx, my = self.sx / self.w, self.sy / self.w
        sxx = max(self.sxx - self.w * mx * mx, 0.0)
        var_y = max(self.syy / self.w - my * my, 0.0)
        prior_var = (SLOPE_SD * my) ** 2
        ridge = min(max(var_y / prior_var, 1e-9), 1e9) if prior_var > 0 else 1e9
        slope = (self.sxy - self.w * mx * my + ridge * prior_slope) / (sxx + ridge)
        return my - slope * mx, slope


@dataclass
class TkSltLength:
    """TK-SLT's optimal gamma, re-evaluated after every round from moving estimates.

    - ``alpha``: discounted MLE of the per-token acceptance: a round that kept ``k`` of ``g`` drafted
      tokens is ``k`` successes in ``k + [k < g]`` Bernoulli trials (positions after the first
      rejection are never tested), started from ``alpha0`` worth two trials.
    - ``a`` (seconds per drafted position) = the measured draft compute per token plus the slope, and
      ``b`` (seconds per round) the intercept, of a discounted regression of the round's wall time minus
      its draft compute on the drafted count. That remainder holds verification, links and the
      scheduler's own overhead without counting any twice, and the slope catches verification or
      uplink time that grows with gamma. The slope is shrunk (:class:`DiscountedFit`) toward the
      uplink time of a position, ``uplink_bytes_per_position * 8 / uplink_bps``, when the option
      ``uplink_bps`` gives the link's rate, else toward 0: learnt from the small spread of gamma alone,
      one slow round set it (on the bundled pair, a slope twice the real one and gamma 4 of a best 8-10).
    - An engine carries these estimates from one session to the next (:meth:`resumed`).
    The first round is not used: it carries the prompt's prefill. TK-SLT models rounds as sequential;
    with drafting overlapped with verification the ``online`` policy, which measures, is the better fit.
    """

    gamma: int
    max_gamma: int
    alpha0: float = 0.6
    decay: float = 0.95  # weight of the past per round
    uplink_bps: float = 0.0  # 0: the link's rate is unknown
    stop_below: float | None = None
    _seen: int = field(default=0, init=False)
    _hits: float = field(default=0.0, init=False)
    _trials: float = field(default=0.0, init=False)
    _draft_s: float = field(default=0.0, init=False)  # discounted sum of draft seconds
    _drafted: float = field(default=0.0, init=False)  # discounted sum of drafted positions
    _prior_slope: float = field(default=0.0, init=False)
    _cost: DiscountedFit = field(init=False)

    def __post_init__(self) -> None:
        self._hits, self._trials = 2 * self.alpha0, 2.0
        self._cost = DiscountedFit(self.decay)

    @classmethod
    def from_options(cls, gamma: int, options: Options) -> "TkSltLength":
        """Reads ``max_gamma``, ``tkslt_alpha`` (prior, default 0.6), ``tkslt_decay`` (0.95), ``uplink_bps``."""
        cap = read_max_gamma(options)
        return cls(
            min(gamma, cap), cap,
            alpha0=read_float(options, "tkslt_alpha", 0.6, 0.0, 1.0, lo_open=True),
            decay=read_float(options, "tkslt_decay", 0.95, 0.0, 0.999),
            uplink_bps=read_float(options, "uplink_bps", 0.0, 0.0, math.inf),
        )

    def resumed(self) -> "TkSltLength":
        """A policy for the engine's next session: these estimates and gamma, a fresh session count
        (its first round, the prefill, is skipped again)."""
        nxt = copy.deepcopy(self)
        nxt._seen = 0
        return nxt

    @property
    def alpha(self) -> float:
        """The current estimate of the per-token acceptance probability."""
        return self._hits / self._trials

    def costs(self) -> tuple[float, float]:
        """``(a, b)``: the current seconds per drafted position and per round."""
        t_d = self._draft_s / self._drafted if self._drafted else 0.0
        b, slope = self._cost.fit(self._prior_slope)
        b = max(b, 1e-9)
        return max(t_d + slope, 1e-9 * b), b

    def next_gamma(self, obs: RoundObservation) -> int:
        self._seen += 1
        if self._seen <= PREFILL_ROUNDS or obs.drafted == 0:
            return self.gamma
        d, g, k = self.decay, obs.drafted, obs.accepted
        self._hits = d * self._hits + k
        self._trials = d * self._trials + k + (k < g)
        self._draft_s = d * self._draft_s + g * obs.draft_s_per_token
        self._drafted = d * self._drafted + g
        self._cost.add(g, obs.round_s - g * obs.draft_s_per_token)
        if self.uplink_bps > 0:
            self._prior_slope = obs.uplink_bytes_per_position * 8 / self.uplink_bps
        alpha = min(max(self.alpha, 1e-3), 1 - 1e-3)
        self.gamma = optimal_gamma(alpha, *self.costs(), self.max_gamma)
        return self.gamma


DRAFT_LENGTH.register("tkslt")(TkSltLength.from_options)
