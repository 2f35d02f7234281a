"""Draft-length policies replayed on the rounds a ``lengths`` point recorded, the clock's noise out.

Under greedy decoding with exact acceptance every run of a prompt commits the target's own greedy
completion, and whether the draft's token at output position ``j`` is the target's does not depend
on how the rounds were cut: a round that starts at ``j`` with ``g`` drafts keeps the run of matches
from ``j``, capped at ``g``, and commits one token more. So the live runs of a point, whatever their
gammas, together say for (nearly) every position whether the draft matched (:func:`trace_of`): a
round of ``g`` that kept ``k < g`` saw matches at ``j .. j+k-1`` and a miss at ``j+k``; only the
bonus position after a fully kept round is not seen, and another run's rounds usually cover it.

Their rounds also say what a round of ``g`` drafts costs on this machine and these links (:class:`RoundCosts`:
the median wall time of the rounds of each ``g``, an affine fit where a ``g`` has too few, and the
spread of single rounds around their median). :func:`replay` then serves the prompts in order with
the *shipped* policy classes (``policies.draft_length.make`` and ``resume``, as the engine does),
capping each round's gamma as the scheduler does; each round's observation carries a time drawn
from the measured spread (the policies meet the machine's noise), while the score adds the medians
(the figure does not depend on when the machine stalled). A static gamma's replay is its live run
with the noise out; an adaptive policy's is judged over many noise seeds on the same acceptance
sequence, which the live figure (one draw of the clock, best of a noisy sweep) cannot give.

Not replayable: ``confidence`` (it stops on the draft's probabilities, which rounds do not record)
and sampled runs (acceptance is then a draw, not a property of the position).
"""
from __future__ import annotations

import dataclasses
import random
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

from specmesh.policies.catalog import make_draft_length as make  # every policy registered
from specmesh.policies.draft_length import RoundObservation, resume

NOT_REPLAYABLE = ("confidence",)
MIN_SAMPLES = 5  # rounds of one gamma for its own median; fewer: the affine fit
SEEDS = 20  # noise draws per adaptive policy


@dataclass(frozen=True)
class Round:
    """One recorded round: ``drafted`` tokens, ``accepted`` of them kept, ``committed`` tokens
    (``accepted + 1`` but at the end of the output), and its times in seconds."""

    drafted: int
    accepted: int
    committed: int
    wall_s: float
    draft_s: float = 0.0
    verify_s: float = 0.0


def trace_of(runs: Iterable[Sequence[Round]], length: int) -> tuple[list[bool | None], int]:
    """Whether the draft matched the target at each output position, and how many positions two
    runs saw differently.

    Args:
        runs: the rounds of each run of one prompt, in order; every run must have committed the same
            ``length`` tokens (the same greedy output).
    Returns:
        ``([length] match or None where no round saw the position, conflicts)``: a position two runs
        saw differently (a near tie that two cuts of the draft's forwards resolved differently)
        keeps what the first run saw.
    Raises:
        ValueError: a run's rounds do not add up to ``length``.
    """
    seen: list[bool | None] = [None] * length
    conflicts = 0
    for rounds in runs:
        at = 0
        for r in rounds:
            outcomes = [True] * min(r.accepted, length - at)
            if r.accepted < r.drafted and at + r.accepted < length:
                outcomes.append(False)
            for j, match in enumerate(outcomes):
                if seen[at + j] is None:
                    seen[at + j] = match
                conflicts += seen[at + j] != match
            at += r.committed
        if at != length:
            raise ValueError(f"rounds commit {at} tokens, not the output's {length}")
    return seen, conflicts


def impute(seen: Sequence[bool | None]) -> tuple[list[bool], int]:
    """``seen`` with every unseen position filled, and how many were. An unseen position is the bonus
    position after a fully kept round, so it follows a match: it gets the more frequent outcome of
    the seen positions that follow a seen match."""
    after = [b for a, b in zip(seen, seen[1:]) if a is True and b is not None]
    fill = sum(after) * 2 >= len(after)
    return [fill if m is None else m for m in seen], sum(m is None for m in seen)


@dataclass(frozen=True)
class RoundCosts:
    """What a round of ``g`` drafts costs, from recorded rounds (seconds).

    Attributes:
        median: ``g`` -> median wall time of the rounds of ``g`` drafts (``g`` with ``MIN_SAMPLES`` rounds).
        fit: ``(a, b)`` of ``wall ~ a + b g`` over every round (least squares): the gammas without a median.
        draft_per_token: median draft compute per drafted position.
        verify_share: median share of a round's wall time spent in the stages' compute.
        spread: every round's wall over its gamma's median or fit: the noise the policies meet.
        prefill: median wall time of a session's first round (the prompt's prefill).
    """

    median: dict[int, float]
    fit: tuple[float, float]
    draft_per_token: float
    verify_share: float
    spread: tuple[float, ...]
    prefill: float

    @classmethod
    def of(cls, sessions: Iterable[Sequence[Round]]) -> "RoundCosts":
        """From the rounds of every session (a session's first round is its prefill)."""
        rounds, firsts = [], []
        for rs in sessions:
            if rs:
                firsts.append(rs[0].wall_s)
                rounds += [r for r in rs[1:] if r.drafted > 0]
        if len({r.drafted for r in rounds}) < 2:
            raise ValueError("replay needs rounds of at least two draft lengths to fit a round's cost")
        by_g: dict[int, list[float]] = {}
        for r in rounds:
            by_g.setdefault(r.drafted, []).append(r.wall_s)
        median = {g: statistics.median(w) for g, w in by_g.items() if len(w) >= MIN_SAMPLES}
        xs, ys = [r.drafted for r in rounds], [r.wall_s for r in rounds]
        b, a = statistics.linear_regression(xs, ys)
        costs = cls(
            median=median, fit=(max(a, 1e-6), max(b, 0.0)),
            draft_per_token=statistics.median(r.draft_s / r.drafted for r in rounds),
            verify_share=statistics.median(r.verify_s / r.wall_s for r in rounds if r.wall_s > 0),
            spread=(), prefill=statistics.median(firsts),
        )
        return dataclasses.replace(costs, spread=tuple(r.wall_s / costs.wall(r.drafted) for r in rounds))

    def wall(self, g: int) -> float:
        """Seconds of a round of ``g`` drafts (``g = 0``: a round of the target alone, the fit at 0)."""
        return self.median.get(g, self.fit[0] + self.fit[1] * g)

    def observe(self, g: int, accepted: int, wall_s: float) -> RoundObservation:
        """What the scheduler hands a policy after such a round, with wall time ``wall_s``."""
        draft = self.draft_per_token * g
        verify = self.verify_share * wall_s
        return RoundObservation(g, accepted, wall_s, self.draft_per_token if g else 0.0, verify,
                                max(0.0, wall_s - draft - verify))


@dataclass(frozen=True)
class Replayed:
    """One replay: tokens committed, seconds (medians), rounds and drafted tokens."""

    tokens: int
    seconds: float
    rounds: int
    drafted: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def replay(name: str, options: dict, traces: Sequence[Sequence[bool]], costs: RoundCosts, *, start_gamma: int,
           max_new_tokens: int, rng: random.Random | None = None, sessions_before: int = 0) -> Replayed:
    """Serves ``traces`` (one a prompt, in order) with the policy ``name`` as one engine would.

    The first session starts the policy afresh at ``start_gamma`` (or at ``options['gamma']`` for a
    static gamma) and each later one resumes it (:func:`~specmesh.policies.draft_length.resume`).
    A round's gamma is capped as the scheduler caps it (``max_new_tokens - made - 1``); a round at
    ``j`` of ``g`` drafts keeps the matches from ``j`` (at most ``g``) and commits one more. Each
    observation's wall time is the round's cost times a draw from ``costs.spread`` (``rng``; None:
    no noise). The first ``sessions_before`` traces are served unmeasured (the bench's warm-up).
    """
    gamma0 = int(options.get("gamma", start_gamma))
    warm = None  # (policy, gamma) the last session of more than one round ended with (SpecMesh._warm)
    tokens = rounds = drafted = 0
    seconds = 0.0
    for i, trace in enumerate(traces):
        policy, gamma = (make(name, gamma0, options), gamma0) if warm is None else resume(*warm)
        made, first, played = 0, True, 0
        while made < len(trace):
            g = max(0, min(gamma, max_new_tokens - made - 1))
            k = 0
            while k < g and made + k < len(trace) and trace[made + k]:
                k += 1
            wall = costs.prefill if first else costs.wall(g)
            noisy = wall * (rng.choice(costs.spread) if rng is not None and not first else 1.0)
            gamma = policy.next_gamma(costs.observe(g, k, noisy))
            committed = min(k + 1, len(trace) - made)
            made, first, played = made + committed, False, played + 1
            if i >= sessions_before:
                tokens, seconds, rounds, drafted = tokens + committed, seconds + wall, rounds + 1, drafted + g
        if played > 1 and name != "fixed":  # a session of one round (the prefill) learned nothing
            warm = (policy, gamma)
    return Replayed(tokens, seconds, rounds, drafted)


def rounds_of(run: dict) -> list[Round]:
    """The rounds of one raw run of the bench (its ``round_log``, milliseconds)."""
    return [Round(g, k, c, w / 1e3, d / 1e3, v / 1e3) for g, k, c, w, d, v in run["round_log"]]


def replay_point(point: dict, *, max_new_tokens: int, start_gamma: int, seeds: int = SEEDS,
                 seed: int = 0) -> dict | None:
    """Every variant of one ``lengths`` point replayed on that point's own rounds (module docstring).

    Returns None when the point cannot be replayed: sampled, or runs without a ``round_log``. Else
    the trace's quality (``positions``, ``imputed``, ``conflicts``, ``excluded_runs``: runs whose
    output is not their prompt's first run's), the costs (``wall_s`` per gamma with a median, the
    ``fit_s``), ``tokens_per_s`` per variant (adaptive: mean over the noise seeds), the best static
    label and ``vs_best_static`` per variant (``mean``, ``min``, ``max`` over the seeds).
    """
    runs = point["runs"]
    if not runs or any("round_log" not in r for r in runs) or any(
            v["overrides"].get("temperature", 0.0) != 0.0 for v in point["variants"]):
        return None
    prompts = list(dict.fromkeys(r["prompt_id"] for r in runs))
    traces, imputed, conflicts, excluded = [], 0, 0, 0
    for pid in prompts:
        mine = [r for r in runs if r["prompt_id"] == pid]
        ref = mine[0]["output_ids"]
        same = [r for r in mine if r["output_ids"] == ref]
        excluded += len(mine) - len(same)
        seen, c = trace_of([rounds_of(r) for r in same], len(ref))
        trace, n = impute(seen)
        traces.append(trace)
        imputed, conflicts = imputed + n, conflicts + c
    costs = RoundCosts.of(rounds_of(r) for r in runs)
    rates: dict[str, list[float]] = {}
    for v in point["variants"]:
        name = v["overrides"].get("draft_length", "fixed")
        if name in NOT_REPLAYABLE:
            continue
        options = {"gamma": v["overrides"]["gamma"]} if "gamma" in v["overrides"] else {}
        draws = [None] if name == "fixed" else [random.Random(seed * 1000 + i) for i in range(seeds)]
        rates[v["label"]] = [replay(name, options, traces, costs, start_gamma=start_gamma,
                                    max_new_tokens=max_new_tokens, rng=rng).tokens_per_s for rng in draws]
    static = [v["label"] for v in point["variants"]
              if v["overrides"].get("draft_length", "fixed") == "fixed" and v["label"] in rates]
    if not static:
        return None
    best = max(static, key=lambda lab: rates[lab][0])
    top = rates[best][0]
    return {
        "positions": sum(map(len, traces)), "imputed": imputed, "conflicts": conflicts, "excluded_runs": excluded,
        "seeds": seeds, "wall_s": {str(g): w for g, w in sorted(costs.median.items())},
        "fit_s": {"per_round": costs.fit[0], "per_drafted": costs.fit[1]}, "prefill_s": costs.prefill,
        "best": best, "tokens_per_s": {lab: statistics.fmean(r) for lab, r in rates.items()},
        "vs_best_static": {lab: {"mean": statistics.fmean(r) / top, "min": min(r) / top, "max": max(r) / top}
                           for lab, r in rates.items()},
    }
