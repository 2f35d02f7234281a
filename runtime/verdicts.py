"""What the scheduler checks of a verdict before it commits it, and how a split verdict is completed.

Kept apart from :mod:`specmesh.runtime.scheduler` (the order of the steps) because these are plain
functions of one verdict: a malformed or misrouted verdict is refused here, never committed.
"""
from __future__ import annotations

import dataclasses

from .messages import VerifyResult


def check_verdict(result: VerifyResult, session_id: str, rnd: int, gamma: int, width: int) -> int:
    """Raises on a verdict for another round or a malformed one; returns the depth drafted (a
    confidence-stopping draft may draft fewer than ``gamma``).

    Args:
        result: the verdict, its correction already drawn (see :func:`completed`).
        session_id, rnd: the round the scheduler waits for.
        gamma: the depth asked of the draft.
        width: candidates per depth (1: a chain).
    """
    if result.session_id != session_id or result.round != rnd:
        raise RuntimeError(
            f"verdict for session {result.session_id} round {result.round} while waiting for "
            f"{session_id} round {rnd}"
        )
    # A chain's mask has one entry per drafted depth (a confidence stop may draft fewer than
    # asked); a tree's has one per candidate, and trees always draft the depth asked.
    drafted = len(result.accepted_mask) if width == 1 or not gamma else gamma
    if not 0 <= drafted <= gamma or not 0 <= result.accepted <= drafted \
            or len(result.tokens) != result.accepted + 1 \
            or (result.path and len(result.path) != result.accepted) or result.pending:
        raise RuntimeError(
            f"malformed verdict: accepted {result.accepted} of {drafted} drafted (asked {gamma}), "
            f"tokens {result.tokens}{', correction still pending' if result.pending else ''}"
        )
    return drafted


def completed(result: VerifyResult, correction: int) -> VerifyResult:
    """A split verdict with its correction drawn: the accepted tokens, then ``correction``."""
    return dataclasses.replace(result, tokens=list(result.tokens) + [int(correction)], correction_p=None)
