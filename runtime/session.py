"""The state of one generation, owned by the scheduler.

The session alone holds the committed tokens; every worker holds only state derivable from them (KV
caches, the draft's speculation), and the session records how much of it each worker still has valid
(``positions``). So a worker that is rebuilt (its positions reset to 0) is brought back by replaying
committed tokens, and a server can hold many sessions side by side.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .stats import SessionStats

DRAFT = "draft"  # the draft worker's entry in ``Session.positions``


def stage_role(index: int) -> str:
    """The name of target stage ``index`` in ``Session.positions`` and in error messages."""
    return f"stage{index}"


@dataclass
class Session:
    """One generation's committed tokens, worker positions, round number and statistics.

    Attributes:
        session_id: names the session in every message.
        prompt: the prompt's token ids.
        output: generated tokens committed so far.
        positions: per worker role (``draft``, ``stage0``, ...), how many committed positions its
            cache holds valid; a worker is told to keep only those before a round.
        round: the last round started (rounds count from 1; round 1 also prefills the prompt).
        gamma: the draft depth the draft-length policy chose for the next round.
        prev_path: the last round's accepted candidate indices (trees: KV compaction on the stages).
        finish_reason: why the generation ended, once it has.
        stats: counters, timings and bytes.
    """

    session_id: str
    prompt: list[int]
    num_stages: int
    gamma: int
    output: list[int] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)
    round: int = 0
    prev_path: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: SessionStats = field(default_factory=SessionStats)

    def __post_init__(self) -> None:
        self.stats.prompt_tokens = len(self.prompt)
        for k in range(self.num_stages):
            self.positions.setdefault(stage_role(k), 0)
        self.positions.setdefault(DRAFT, 0)

    @property
    def committed(self) -> list[int]:
        """Prompt plus output: every token that is final."""
        return self.prompt + self.output

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def target_keep(self) -> int:
        """Cache positions every stage still holds valid: the round's rollback position."""
        return min(self.positions[stage_role(k)] for k in range(self.num_stages))

    def next_round(self) -> int:
        self.round += 1
        return self.round

    def commit(self, new: list[int], accepted: int, base: int, path: list[int]) -> None:
        """Records a verdict: ``new`` tokens are final; the stages hold ``base + accepted`` valid
        positions (the accepted candidates; the last committed token is fed next round)."""
        self.output.extend(new)
        for k in range(self.num_stages):
            self.positions[stage_role(k)] = base + accepted
        self.prev_path = list(path)

    def told_draft(self) -> None:
        """The draft has been sent every committed token."""
        self.positions[DRAFT] = self.length

    def invalidate(self, role: str) -> None:
        """Worker ``role`` lost its state (restarted): it must be sent everything again."""
        self.positions[role] = 0
        if role != DRAFT:
            self.prev_path = []
