"""Draft-length policies: how many tokens the draft proposes next round.

A policy is a small object with per-session state. After every round the scheduler hands it a
:class:`RoundObservation` and asks ``next_gamma(obs)``; ``stop_below`` (None for most policies) tells the
draft to stop a round early at a depth where its top probability falls below the value (HF's
confidence stop). Policies are made by name from the session's policy map:
``make(name, gamma, options)``.

- ``fixed``: always ``gamma``.
- ``heuristic``: HF assisted generation's schedule: +2 after a fully accepted round, -1 otherwise
  (floor 1), capped at ``max_gamma``.
- ``confidence``: HF's confidence stop: draft up to ``max_gamma`` (default 20) tokens and stop at a
  depth whose draft top probability is below ``confidence_threshold`` (default 0.4). HF also tunes the
  threshold online from the draft probabilities of matched and unmatched tokens; an observation
  carries no per-position draft probabilities, so here the threshold stays where it is set.
- ``tkslt``: TK-SLT's closed-form optimum (:mod:`specmesh.policies.tkslt`) fed with the measured
  costs and an exponentially discounted estimate of the acceptance rate (:mod:`.tkslt`).
- ``online``: needs no model of acceptance: plays the gamma of highest estimated tokens/s from the
  measured per-depth acceptance and round times (:mod:`.online_length`).

An engine carries a session's policy into its next session of the same policy and options
(:func:`resume`): a policy that learns (``resumed()``) keeps its estimates, any other its gamma.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Protocol

from .options import Options, read_float, read_int
from .registry import Registry

MAX_GAMMA = 20  # HF assisted generation's default num_assistant_tokens: the cap unless told otherwise
GAMMA_LIMIT = 256  # the largest cap a policy map may ask for
PREFILL_ROUNDS = 1  # the first round of a session carries the prompt's prefill: adaptive policies skip it


@dataclass(frozen=True)
class RoundObservation:
    """What one finished round tells a draft-length policy.

    Attributes:
        drafted: tokens drafted this round (may be below the policy's gamma: stops and caps).
        accepted: drafted tokens kept (0..drafted).
        round_s: wall time of the round, seconds.
        draft_s_per_token: measured draft compute per drafted position (0 if unknown).
        verify_s: measured target compute of the round (sum over stages).
        link_s: measured or modelled link delay of the round (both ways).
        uplink_bytes_per_position: uplink bytes per drafted position (sparse q and token id).
    """

    drafted: int
    accepted: int
    round_s: float
    draft_s_per_token: float = 0.0
    verify_s: float = 0.0
    link_s: float = 0.0
    uplink_bytes_per_position: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.accepted <= self.drafted:
            raise ValueError(f"accepted {self.accepted} of {self.drafted} drafted: need 0 <= accepted <= drafted")
        for name in ("round_s", "draft_s_per_token", "verify_s", "link_s", "uplink_bytes_per_position"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} = {getattr(self, name)!r}: must be >= 0")


class DraftLengthPolicy(Protocol):
    """Per-session draft-length state."""

    stop_below: float | None  # stop drafting at a depth whose draft top probability is below this

    def next_gamma(self, obs: RoundObservation) -> int:
        """The draft length of the next round (>= 1), after observing the last one."""
        ...


@dataclass
class FixedLength:
    """Always ``gamma``."""

    gamma: int
    stop_below: float | None = None

    def next_gamma(self, obs: RoundObservation) -> int:
        return self.gamma


@dataclass
class HeuristicLength:
    """HF assisted generation's ``heuristic`` schedule.

    ``gamma += 2`` after a round whose drafted tokens were all accepted, else ``gamma = max(1, gamma - 1)``
    (``AssistedCandidateGenerator.update_candidate_strategy``), capped at ``max_gamma`` (HF has no cap
    but the context; ours bounds the draft time a long fully accepted streak can build up).
    """

    gamma: int
    max_gamma: int = MAX_GAMMA
    stop_below: float | None = None

    def next_gamma(self, obs: RoundObservation) -> int:
        if obs.drafted and obs.accepted == obs.drafted:
            self.gamma = min(self.gamma + 2, self.max_gamma)
        elif obs.drafted:
            self.gamma = max(self.gamma - 1, 1)
        return self.gamma


@dataclass
class ConfidenceLength:
    """HF's confidence stop: up to ``max_gamma`` drafts, stop where the draft's top probability < threshold."""

    max_gamma: int = MAX_GAMMA
    stop_below: float | None = 0.4

    def next_gamma(self, obs: RoundObservation) -> int:
        return self.max_gamma


def resume(policy: DraftLengthPolicy, last_gamma: int) -> tuple[DraftLengthPolicy, int]:
    """The policy and first gamma of an engine's next session after one that ended with ``policy``
    at ``last_gamma``: a policy with ``resumed()`` (``online``, ``tkslt``) carries its estimates and
    starts at its incumbent gamma; any other is copied as it ended and starts at ``last_gamma``."""
    if hasattr(policy, "resumed"):
        nxt = policy.resumed()
        return nxt, nxt.gamma
    return copy.deepcopy(policy), last_gamma


Factory = Callable[[int, Options], DraftLengthPolicy]
DRAFT_LENGTH: Registry[Factory] = Registry("draft-length policy")


def read_max_gamma(options: Options) -> int:
    """The ``max_gamma`` option (cap of the adaptive policies), default 20."""
    return read_int(options, "max_gamma", MAX_GAMMA, 1, GAMMA_LIMIT)


def _fixed(gamma: int, options: Options) -> DraftLengthPolicy:
    return FixedLength(gamma)


def _heuristic(gamma: int, options: Options) -> DraftLengthPolicy:
    cap = read_max_gamma(options)
    return HeuristicLength(min(gamma, cap), cap)


def _confidence(gamma: int, options: Options) -> DraftLengthPolicy:
    # HF drafts num_assistant_tokens (default 20) under the stop: the cap, not the starting gamma.
    threshold = read_float(options, "confidence_threshold", 0.4, 0.0, 1.0, lo_open=True)
    return ConfidenceLength(read_max_gamma(options), threshold)


DRAFT_LENGTH.register("fixed")(_fixed)
DRAFT_LENGTH.register("heuristic")(_heuristic)
DRAFT_LENGTH.register("confidence")(_confidence)
# "tkslt" and "online" register themselves from policies/tkslt.py and policies/online_length.py.


def make(name: str, gamma: int, options: Options | None = None) -> DraftLengthPolicy:
    """A fresh policy named ``name`` starting at ``gamma``, configured by the session's policy map.

    Raises:
        ValueError: unknown name, ``gamma < 1``, or a bad value of an option the policy reads.
    """
    factory = DRAFT_LENGTH.get(name)
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma = {gamma!r}: must be an integer >= 1")
    return factory(gamma, options or {})
