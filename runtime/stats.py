"""Per-session statistics, following vLLM's spec-decode metrics.

Mean accepted length counts the bonus/correction token: a round that accepts ``a`` of ``g`` draft
tokens commits ``a + 1`` tokens, so target-only decoding has mean accepted length exactly 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RoundRecord:
    """One round: what was drafted, what was kept, where the time went (milliseconds).

    ``gamma`` is the draft depth (a tree of width c sends ``gamma * c`` candidates).
    """

    round: int
    gamma: int
    accepted: int
    committed: int
    wall_ms: float
    stage_ms: tuple[float, ...] = ()
    draft_ms: float = 0.0  # the draft's compute for this round's proposal (speculation done earlier not included)


@dataclass
class SessionStats:
    """Counters of one generation.

    Attributes:
        prompt_tokens / generated_tokens: lengths.
        rounds: verification rounds (one target pass each).
        drafted / accepted: draft tokens proposed / accepted.
        position_tried / position_accepted: per draft position i (0-based), rounds that tested it and
            rounds that accepted it.
        wall_s: wall time of the whole generation.
        bytes_up / bytes_down: bytes that crossed device->edge / edge->device links.
        bytes_between_stages: bytes between target stages.
        records: every round.
        draft_counters: the draft's work: ``forwards`` (depths computed, speculative included),
            ``speculated`` (computed ahead of a verdict), ``reused`` (speculative depths proposed).
        recoveries: what failed and how the session went on (a replaced stage, a draft lost and back).
        link_delay_ms / codec_ms: modelled link delay and encode/decode time of this session's messages.
    """

    prompt_tokens: int = 0
    generated_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    position_tried: list[int] = field(default_factory=list)
    position_accepted: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_between_stages: int = 0
    records: list[RoundRecord] = field(default_factory=list)
    draft_counters: dict[str, int] = field(default_factory=dict)
    recoveries: list[str] = field(default_factory=list)
    link_delay_ms: float = 0.0
    codec_ms: float = 0.0

    def add_round(self, record: RoundRecord, accepted_mask: list[bool]) -> None:
        self.rounds += 1
        self.drafted += record.gamma
        self.accepted += record.accepted
        self.generated_tokens += record.committed
        for i, ok in enumerate(accepted_mask):
            while len(self.position_tried) <= i:
                self.position_tried.append(0)
                self.position_accepted.append(0)
            # A position was tested when every earlier one was accepted.
            if i == 0 or accepted_mask[i - 1]:
                self.position_tried[i] += 1
                self.position_accepted[i] += int(ok)
        self.records.append(record)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted draft tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per round, counting the bonus/correction token."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / t if t else 0.0 for a, t in zip(self.position_accepted, self.position_tried)]

    @property
    def draft_work_used(self) -> float:
        """Fraction of draft forward passes whose result reached a proposal (1.0 without overlap)."""
        c = self.draft_counters
        if not c.get("forwards"):
            return 0.0
        return (c["forwards"] - c.get("speculated", 0) + c.get("reused", 0)) / c["forwards"]

    def busy_fraction(self) -> dict[str, float]:
        """Share of the wall time each worker spent computing (the rest is idle or waiting)."""
        if not self.wall_s:
            return {}
        wall_ms = self.wall_s * 1e3
        stages: list[float] = []
        for r in self.records:
            for i, ms in enumerate(r.stage_ms):
                stages.extend([0.0] * (i + 1 - len(stages)))
                stages[i] += ms
        out = {f"stage{i}": ms / wall_ms for i, ms in enumerate(stages)}
        if "busy_ms" in self.draft_counters:
            out["draft"] = self.draft_counters["busy_ms"] / wall_ms
        return out

    @property
    def speculation_hit_rate(self) -> float:
        """Share of proposals that reused depths drafted ahead, during the previous verification."""
        c = self.draft_counters
        return c.get("proposals_hit", 0) / c["proposals"] if c.get("proposals") else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def first_round_s(self) -> float:
        """Time of round 1, which also prefills the prompt (time to first token)."""
        return self.records[0].wall_ms / 1e3 if self.records else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after round 1: decoding speed without the prompt's prefill."""
        if len(self.records) < 2:
            return 0.0
        tokens = self.generated_tokens - self.records[0].committed
        return tokens / max(self.wall_s - self.first_round_s, 1e-9)

    @property
    def bytes_up_per_token(self) -> float:
        return self.bytes_up / self.generated_tokens if self.generated_tokens else 0.0

    @property
    def bytes_down_per_token(self) -> float:
        return self.bytes_down / self.generated_tokens if self.generated_tokens else 0.0

    def profile(self) -> dict[str, float]:
        """Where the rounds' time went (milliseconds, summed over rounds) and the limit they allow.

        ``draft`` is the draft's compute on the critical path (what each proposal waited for; work
        speculated during the previous verification is off it), ``stages`` the target's compute,
        ``links`` the modelled link delay, ``codec`` encoding and decoding, ``rest`` everything else
        (Ray, the driver, Python, thread hand-offs). ``limit`` = draft + stages + links: the round
        time the measured compute and links allow, with no overhead; ``efficiency`` = limit / wall.
        """
        wall = sum(r.wall_ms for r in self.records)
        draft = sum(r.draft_ms for r in self.records)
        stages = sum(sum(r.stage_ms) for r in self.records)
        limit = draft + stages + self.link_delay_ms
        return {
            "wall": wall, "draft": draft, "stages": stages, "links": self.link_delay_ms,
            "codec": self.codec_ms, "rest": wall - limit - self.codec_ms, "limit": limit,
            "efficiency": limit / wall if wall else 0.0,
        }

    def summary(self) -> dict:
        """The headline figures, for printing and JSON."""
        return {
            "generated_tokens": self.generated_tokens,
            "rounds": self.rounds,
            "wall_s": round(self.wall_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "first_round_s": round(self.first_round_s, 3),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "bytes_up_per_token": round(self.bytes_up_per_token, 1),
            "bytes_down_per_token": round(self.bytes_down_per_token, 1),
            "draft_work_used": round(self.draft_work_used, 3),
            "busy_fraction": {k: round(v, 3) for k, v in self.busy_fraction().items()},
            "speculation_hit_rate": round(self.speculation_hit_rate, 3),
            "profile_ms": {k: round(v, 3) for k, v in self.profile().items()},
        }
