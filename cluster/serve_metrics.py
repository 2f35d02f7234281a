"""Prometheus metrics of ``specmesh serve``, named after vLLM's where vLLM has the same figure.

Spec-decode counters follow vLLM's ``spec_decode/metrics.py`` (``spec_decode_num_drafts``,
``..._num_draft_tokens``, ``..._num_accepted_tokens``, ``..._num_accepted_tokens_per_pos`` by
``position``), with SpecMesh's ``specmesh:`` prefix in place of ``vllm:``. A draft token is a draft
*depth* (a tree of width c proposes c candidates per depth, as :class:`SessionStats` counts them).
Counters move after every round; the bytes per link and direction are read from the backend's
traffic meter when the endpoint is scraped.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from specmesh.runtime.stats import SessionStats
from specmesh.runtime.traffic import TrafficMeter

log = logging.getLogger(__name__)
PREFIX = "specmesh:"
# Bucket edges in seconds: rounds and per-token times span a fast loopback to a radio link.
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class ServeMetrics:
    """The server's metrics, in a registry of their own (several servers may share a process).

    Args:
        traffic: the backend's meter, read at scrape time for bytes per link and direction.
        load: returns ``(running, waiting)`` requests, read at scrape time.
    """

    def __init__(self, traffic: TrafficMeter, load: Callable[[], tuple[int, int]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        self.num_drafts = counter("spec_decode_num_drafts", "Rounds that verified at least one draft token.")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens (depths) proposed.")
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.accepted_per_pos = counter("spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted at each draft position (0-based).", ("position",))
        self.rounds = counter("num_rounds", "Verification rounds (one target pass each).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens, counted as they are committed.")
        self.requests = counter("request_success", "Finished requests by finish reason.", ("finished_reason",))
        self.failures = counter("request_failure", "Requests whose generation raised.")
        self.cancelled = counter("request_cancelled", "Requests cancelled by a client that went away.")
        self.rejected = counter("request_rejected", "Requests refused because the server was full.")
        self.round_time = Histogram(PREFIX + "round_time_seconds", "Wall time of one round (prefill included "
                                    "in round 1).", buckets=_FAST, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=_SLOW, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Per request: (last - first token "
                              "time) / (generated - 1).", buckets=_FAST, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to the end of the generation.",
                             buckets=_SLOW, registry=r)
        r.register(_LiveCollector(traffic, load))

    def session(self, arrival: float, prompt_tokens: int) -> "SessionMeter":
        """A meter for one admitted request that arrived at ``arrival`` (``time.perf_counter()``)."""
        self.prompt_tokens.inc(prompt_tokens)
        return SessionMeter(self, arrival)


class SessionMeter:
    """Moves the server's counters as one session's rounds are committed."""

    def __init__(self, metrics: ServeMetrics, arrival: float) -> None:
        self.m = metrics
        self.arrival = arrival
        self.first_token_at: float | None = None
        self.generated = 0
        self._records_seen = 0

    def progress(self, new_tokens: list[int], stats: SessionStats) -> None:
        """After a round: counts its tokens and every round record not yet counted."""
        now = time.perf_counter()
        if new_tokens and self.first_token_at is None:
            self.first_token_at = now
            self.m.ttft.observe(now - self.arrival)
        self.generated += len(new_tokens)
        self.m.generation_tokens.inc(len(new_tokens))
        for record in stats.records[self._records_seen:]:
            self.m.rounds.inc()
            self.m.round_time.observe(record.wall_ms / 1e3)
            if record.gamma > 0:
                self.m.num_drafts.inc()
                self.m.num_draft_tokens.inc(record.gamma)
                self.m.num_accepted_tokens.inc(record.accepted)
                for pos in range(record.accepted):
                    self.m.accepted_per_pos.labels(position=str(pos)).inc()
        self._records_seen = len(stats.records)

    def finish(self, finish_reason: str) -> None:
        now = time.perf_counter()
        self.m.requests.labels(finished_reason=finish_reason).inc()
        self.m.e2e.observe(now - self.arrival)
        if self.first_token_at is not None and self.generated > 1:
            self.m.tpot.observe((now - self.first_token_at) / (self.generated - 1))

    def cancel(self) -> None:
        self.m.cancelled.inc()

    def fail(self) -> None:
        self.m.failures.inc()


class _LiveCollector:
    """Figures read when scraped: bytes and messages per link and direction, requests in flight."""

    def __init__(self, traffic: TrafficMeter, load: Callable[[], tuple[int, int]]) -> None:
        self.traffic = traffic
        self.load = load

    def collect(self):
        running, waiting = self.load()
        for name, value, doc in (("num_requests_running", running, "Requests generating now."),
                                 ("num_requests_waiting", waiting, "Requests queued for a free slot.")):
            g = GaugeMetricFamily(PREFIX + name, doc)
            g.add_metric([], value)
            yield g
        nbytes = CounterMetricFamily(PREFIX + "link_bytes", "Bytes sent per link and direction "
                                     "(up = away from the device).", labels=["link", "direction"])
        messages = CounterMetricFamily(PREFIX + "link_messages", "Messages sent per link and direction.",
                                       labels=["link", "direction"])
        try:
            rows = self.traffic.snapshot().as_rows()
        except Exception as exc:  # a remote meter may be unreachable; the rest still answers
            log.warning("traffic counters unreadable: %s", exc)
            rows = []
        for row in rows:
            nbytes.add_metric([row["link"], row["direction"]], row["bytes"])
            messages.add_metric([row["link"], row["direction"]], row["messages"])
        yield nbytes
        yield messages
