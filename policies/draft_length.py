"""Draft-length policies: how many tokens the draft proposes next round.

A policy is a small object with per-session state: ``next_gamma(accepted, drafted) -> gamma``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .registry import Registry


@dataclass
class FixedLength:
    """Always ``gamma``."""

    gamma: int

    def next_gamma(self, accepted: int, drafted: int) -> int:
        return self.gamma


@dataclass
class HeuristicLength:
    """HF assisted generation's older schedule: +2 after a fully accepted round, -1 otherwise."""

    gamma: int
    max_gamma: int = 16

    def next_gamma(self, accepted: int, drafted: int) -> int:
        if drafted and accepted == drafted:
            self.gamma = min(self.gamma + 2, self.max_gamma)
        elif drafted:
            self.gamma = max(self.gamma - 1, 1)
        return self.gamma


DRAFT_LENGTH: Registry[Callable[[int], object]] = Registry("draft-length policy")
DRAFT_LENGTH.register("fixed")(FixedLength)
DRAFT_LENGTH.register("heuristic")(HeuristicLength)


def make(name: str, gamma: int):
    """A fresh policy object named ``name`` starting at ``gamma``."""
    return DRAFT_LENGTH.get(name)(gamma)
