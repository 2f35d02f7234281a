"""Byte accounting: what every send put on which link, in which direction.

A :class:`TrafficMeter` lives in each process that sends; it is thread-safe and cheap (one lock, a
dict). Its :class:`TrafficSnapshot` is an immutable value that crosses process boundaries as plain
data and merges with other snapshots, so the driver can add up the meters of every worker and report
uplink and downlink bytes per generated token. Pure Python: no Ray, no torch.

Directions: ``UPLINK`` is away from the user's device (draft -> stage 0 -> ... -> last stage),
``DOWNLINK`` is back towards it (verdicts, split-verification payloads).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable, Mapping

UPLINK = "up"
DOWNLINK = "down"
DIRECTIONS = (UPLINK, DOWNLINK)


@dataclass(frozen=True)
class LinkTraffic:
    """Bytes and messages counted on one (link, direction), and the time they cost there.

    Attributes:
        delay_ms: modelled link delay the receivers waited (0 on a real network, which delays
            the messages itself).
        codec_ms: time spent encoding (sender) and decoding (receiver) the messages.
    """

    bytes: int = 0
    messages: int = 0
    delay_ms: float = 0.0
    codec_ms: float = 0.0

    def __add__(self, other: "LinkTraffic") -> "LinkTraffic":
        return LinkTraffic(self.bytes + other.bytes, self.messages + other.messages,
                           self.delay_ms + other.delay_ms, self.codec_ms + other.codec_ms)


@dataclass(frozen=True)
class TrafficSnapshot:
    """An immutable copy of a meter's counts, keyed by ``(link, direction)``.

    Attributes:
        counts: ``{(link, direction): LinkTraffic}``; treat as read-only.
    """

    counts: Mapping[tuple[str, str], LinkTraffic] = field(default_factory=dict)

    def merged(self, other: "TrafficSnapshot") -> "TrafficSnapshot":
        """The sum of two snapshots (for instance of two workers' meters)."""
        out = dict(self.counts)
        for key, traffic in other.counts.items():
            out[key] = out.get(key, LinkTraffic()) + traffic
        return TrafficSnapshot(out)

    def total(self, direction: str | None = None, links: Iterable[str] | None = None) -> LinkTraffic:
        """Sum over the selected direction (both if ``None``) and links (all if ``None``)."""
        if direction is not None:
            _check_direction(direction)
        wanted = None if links is None else set(links)
        out = LinkTraffic()
        for (link, way), traffic in self.counts.items():
            if (direction is None or way == direction) and (wanted is None or link in wanted):
                out = out + traffic
        return out

    def bytes_per_token(self, generated_tokens: int, direction: str,
                        links: Iterable[str] | None = None) -> float:
        """Bytes sent in ``direction`` (over ``links``) per generated token.

        Raises:
            ValueError: ``generated_tokens < 1``.
        """
        if generated_tokens < 1:
            raise ValueError(f"generated_tokens must be >= 1, got {generated_tokens}")
        return self.total(direction, links).bytes / generated_tokens

    def as_rows(self) -> list[dict]:
        """Plain rows ``{link, direction, bytes, messages}``, sorted, for JSON and tables."""
        return [{"link": link, "direction": way, "bytes": t.bytes, "messages": t.messages,
                 "delay_ms": round(t.delay_ms, 3), "codec_ms": round(t.codec_ms, 3)}
                for (link, way), t in sorted(self.counts.items())]


class TrafficMeter:
    """Thread-safe counter of bytes and messages per (link, direction)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], LinkTraffic] = {}
        # The same counts split by session, so concurrent sessions each see their own bytes.
        self._by_session: dict[str, dict[tuple[str, str], LinkTraffic]] = {}

    def record(self, link: str, direction: str, nbytes: int, session: str | None = None,
               delay_ms: float = 0.0, codec_ms: float = 0.0) -> None:
        """Counts one message of ``nbytes`` bytes sent on ``link`` in ``direction`` (for
        ``session`` too, when given), with the link delay and codec time it cost.

        Raises:
            ValueError: unknown direction, empty link name or negative size.
        """
        _check_direction(direction)
        if not link:
            raise ValueError("link name must be a non-empty string")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        key = (link, direction)
        one = LinkTraffic(int(nbytes), 1, float(delay_ms), float(codec_ms))
        with self._lock:
            self._counts[key] = self._counts.get(key, LinkTraffic()) + one
            if session is not None:
                counts = self._by_session.setdefault(session, {})
                counts[key] = counts.get(key, LinkTraffic()) + one

    def add_codec_time(self, link: str, direction: str, codec_ms: float, session: str | None = None) -> None:
        """Adds a sender's encoding time to ``link`` (no message counted: the receiver counts it)."""
        key = (link, direction)
        extra = LinkTraffic(0, 0, 0.0, float(codec_ms))
        with self._lock:
            self._counts[key] = self._counts.get(key, LinkTraffic()) + extra
            if session is not None:
                counts = self._by_session.setdefault(session, {})
                counts[key] = counts.get(key, LinkTraffic()) + extra

    def snapshot(self, session: str | None = None) -> TrafficSnapshot:
        """An immutable copy of the counts so far (of one session's messages, when given)."""
        with self._lock:
            if session is not None:
                return TrafficSnapshot(dict(self._by_session.get(session, {})))
            return TrafficSnapshot(dict(self._counts))

    def forget(self, session: str) -> None:
        """Drops the per-session counts of a finished session (the totals stay)."""
        with self._lock:
            self._by_session.pop(session, None)

    def merge(self, other: TrafficSnapshot) -> None:
        """Adds another snapshot's counts into this meter (a remote worker's, say)."""
        with self._lock:
            self._counts = dict(TrafficSnapshot(self._counts).merged(other).counts)

    def reset(self) -> TrafficSnapshot:
        """Clears the meter and returns what it held."""
        with self._lock:
            held, self._counts, self._by_session = TrafficSnapshot(self._counts), {}, {}
        return held


def per_generated_token(snapshot: TrafficSnapshot, generated_tokens: int) -> dict[str, float]:
    """``{"uplink": bytes/token, "downlink": bytes/token}`` over every link of ``snapshot``."""
    return {"uplink": snapshot.bytes_per_token(generated_tokens, UPLINK),
            "downlink": snapshot.bytes_per_token(generated_tokens, DOWNLINK)}


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
