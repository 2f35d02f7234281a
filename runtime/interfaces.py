"""The two small interfaces through which the scheduler drives workers, whatever the backend.

In-process, a handle is the message object itself; on Ray it is an ``ObjectRef`` that flows from the
draft actor to the first stage without passing through the driver.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .messages import OpenSession, ProposeRequest, VerifyResult
from .traffic import TrafficMeter


class WorkerFailure(RuntimeError):
    """A worker died, missed its deadline or is unreachable (not: it answered with an error).

    Attributes:
        role: the worker that failed ("draft", "stage0", ...), or None when it is not known.
        dead: True when the worker is known gone (died, node lost) rather than slow.
    """

    def __init__(self, message: str, role: str | None = None, dead: bool = False) -> None:
        super().__init__(message)
        self.role = role
        self.dead = dead


@dataclass(frozen=True)
class ModelInfo:
    """What the scheduler must know of the target model.

    Attributes:
        vocab_size: vocabulary of p (the draft's must be equal).
        max_positions: context length.
        num_layers: decoder layers of the target.
        eos_token_ids: tokens that end generation.
    """

    vocab_size: int
    max_positions: int
    num_layers: int
    eos_token_ids: tuple[int, ...] = ()


class Drafter(Protocol):
    def open(self, msg: OpenSession) -> None: ...

    def close(self, session_id: str) -> dict[str, int]:
        """Frees the session; returns its drafting counters."""

    def propose(self, req: ProposeRequest) -> Any:
        """Starts drafting a round; returns a handle to its :class:`DraftProposal`."""

    def recover(self) -> bool:
        """Replaces a failed draft worker; False when it cannot be brought back (yet)."""

    def speculate(self, session_id: str, gamma: int, width: int, budget_ms: float | None) -> None:
        """Drafts the next round ahead (``gamma`` depths of ``width``, within ``budget_ms``), on
        the likeliest verdict, while this one is verified (fire and forget on Ray; inline in process)."""

    def resolve(self, verdict: VerifyResult) -> int:
        """Split verification: the correction token of a verdict whose correction is pending, drawn
        by the draft from ``norm(max(p_j - q_j, 0))`` with the ``q_j`` it kept (on Ray the verdict
        crosses to the draft actor as a codec frame)."""


class Target(Protocol):
    def open(self, msg: OpenSession) -> None: ...

    def close(self, session_id: str) -> None: ...

    def verify(self, proposal: Any) -> VerifyResult:
        """Runs a proposal (or a handle to one) through every stage; returns the verdict."""

    def recover(self, role: str) -> bool:
        """Replaces failed stage ``role`` with a fresh worker (weights reloaded, no sessions);
        False when this backend cannot (the session then ends with its committed tokens)."""


@dataclass
class Backend:
    """A wired pipeline: the draft (None for target-only), the target stages, and model facts.

    Attributes:
        drafter: the draft side, or None when no draft model is configured.
        target: the target pipeline.
        info: facts about the target model.
        tokenizer: a Hugging Face tokenizer, or None (tiny models: prompts are token ids).
        traffic: bytes per link and direction, filled by the backend (``snapshot()`` sums them).
        device_links: names of the links between the device and the target (the radio uplink and
            downlink); the other links are between stages.
        close: releases every worker and process.
        workers: where each worker runs (node, pid, threads), for reports; may be empty.
        num_stages: target pipeline stages (the session tracks each one's cache positions).
        draft_cores_disjoint: the draft computes on cores no stage uses (separate machines, or a
            pinned layout on one machine): drafting ahead overlaps verification, so overlap is on.
    """

    drafter: Drafter | None
    target: Target
    info: ModelInfo
    tokenizer: Any = None
    traffic: TrafficMeter = field(default_factory=TrafficMeter)
    device_links: tuple[str, ...] = ()
    close: Callable[[], None] = lambda: None
    workers: list[dict] = field(default_factory=list)
    num_stages: int = 1
    draft_cores_disjoint: bool = False
