"""Speculation on the verdict: which outcomes of the round in flight the draft drafts ahead for.

While a proposal is verified the draft is idle. It drafts the next round for the verdicts it finds
likeliest, best first, until the time the verification is expected to take is spent:

1. every candidate accepted, and the bonus token the draft itself would draw next;
2. (chains) the last candidate rejected, and the correction the draft finds likeliest there: its
   most probable token other than the rejected one (the target's residual puts its mass where the
   target likes a token more than the draft did, so the draft's runner-up is the best guess it has;
   at temperature 0 the correction is the target's argmax, often the draft's second choice);
3. every candidate accepted, and the draft's runner-up for the bonus token.

A branch that is not the last drafted keeps a snapshot of the draft's cache after it (its KV rows,
its cached tokens, its last logits), so whichever branch the verdict confirms is proposed from the
cache state that drafting it left: reuse costs no forward. Drafting is a pure function of the
context (keyed draws, canonical feeding), so reused depths are exactly the depths a proposal after
that verdict would draft: speculation never changes an output.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Branch:
    """Depths drafted ahead for one guessed verdict.

    Attributes:
        context: the committed tokens that verdict would leave.
        depths: the depths drafted after ``context`` (each a ``Depth`` of ``actors/draft.py``).
        state: the draft's cache state right after drafting them, when a later branch has moved the
            live cache on (None: the live cache is this branch's).
    """

    context: list[int]
    depths: list
    state: tuple[Any, list[int], torch.Tensor | None] | None = None


def alternative_verdicts(committed: list[int], drafted: list[int], last_alt: int | None,
                         bonus_alt: int | None) -> list[list[int]]:
    """Contexts of the guessed verdicts after the first (all accepted with the draft's own bonus
    guess), best first: the last candidate rejected with the draft's runner-up there, then every
    candidate accepted with the draft's runner-up for the bonus.

    Args:
        committed: tokens committed before the round in flight.
        drafted: the round's chain of candidates ``[g]``.
        last_alt: the draft's likeliest token other than the last candidate, at its position.
        bonus_alt: the draft's likeliest token other than its bonus guess, after the chain.
    """
    out: list[list[int]] = []
    if drafted and last_alt is not None:
        out.append(committed + drafted[:-1] + [last_alt])
    if bonus_alt is not None:
        out.append(committed + drafted + [bonus_alt])
    return out


def snapshot(cache: Any, cached: list[int], last_logits: torch.Tensor | None) -> tuple:
    """A copy of the draft's cache state that later drafting cannot change."""
    return copy.deepcopy(cache), list(cached), last_logits
