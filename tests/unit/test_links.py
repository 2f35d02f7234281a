"""The link model: the delay formula, what each emulate mode keeps, and the modelled sleep (exact)."""
from __future__ import annotations

import math
import re
import time

import pytest

from specmesh.cluster import links
from specmesh.cluster.links import IDEAL, LinkSpec, emulated, sleep_for


def test_delay_formula_is_exact():
    link = LinkSpec(latency_ms=20, bandwidth_mbps=10)
    assert link.delay_s(0) == 0.020
    assert link.transfer_s(1_000_000) == 0.8  # 8 Mbit at 10 Mbit/s: megabits are decimal
    assert link.delay_s(1_000_000) == pytest.approx(0.820, rel=1e-12)
    assert LinkSpec(latency_ms=7).delay_s(10**9) == 0.007  # unlimited bandwidth: latency only
    assert IDEAL.delay_s(10**9) == 0 and IDEAL.is_ideal and not link.is_ideal
    assert not LinkSpec(latency_ms=0, bandwidth_mbps=1000).is_ideal  # bandwidth alone still delays
    assert link.latency_only() == LinkSpec(20)
    with pytest.raises(ValueError, match="nbytes = -1"):
        link.delay_s(-1)


@pytest.mark.parametrize("kwargs, message", [
    ({"latency_ms": -1}, "latency_ms = -1"),
    ({"latency_ms": math.inf}, "latency_ms = inf"),
    ({"bandwidth_mbps": 0}, "bandwidth_mbps = 0"),
    ({"bandwidth_mbps": math.nan}, "bandwidth_mbps = nan"),
])
def test_link_spec_rejects(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LinkSpec(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"latency_ms": "20"}, "latency_ms = '20'"),
    ({"bandwidth_mbps": True}, "bandwidth_mbps = True"),
])
def test_link_spec_rejects_wrong_types(kwargs, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        LinkSpec(**kwargs)


def test_emulated_modes():
    link = LinkSpec(20, 10)
    assert emulated(link, "auto", real_network=False) == link
    assert emulated(link, "auto", real_network=True) == IDEAL
    assert emulated(link, "on", real_network=True) == link
    assert emulated(link, "off", real_network=False) == IDEAL
    assert emulated(link, "latency", real_network=True) == LinkSpec(20)
    with pytest.raises(ValueError, match="emulate = 'sometimes'"):
        emulated(link, "sometimes", real_network=False)


@pytest.fixture
def recorded_sleeps(monkeypatch):
    """Every duration ``sleep_for`` asks the clock for, instead of sleeping."""
    asked: list[float] = []
    monkeypatch.setattr(links.time, "sleep", asked.append)
    return asked


@pytest.mark.parametrize("latency_ms, mbps, nbytes, expected_s", [
    (30, 8, 10_000, 0.040),  # 30 ms + 80 kbit at 8 Mbit/s (10 ms)
    (0, 100, 1_250_000, 0.100),  # bandwidth only: 10 Mbit at 100 Mbit/s
    (50, math.inf, 10**9, 0.050),  # latency only, whatever the size
])
def test_sleep_for_asks_for_exactly_the_modelled_delay(recorded_sleeps, latency_ms, mbps, nbytes, expected_s):
    # A modelled-time check: too long a sleep fails here as surely as too short a one.
    slept = sleep_for(LinkSpec(latency_ms, mbps), nbytes)
    assert recorded_sleeps == [pytest.approx(expected_s, rel=1e-12)]
    assert slept == recorded_sleeps[0]


def test_sleep_for_an_ideal_link_never_sleeps(recorded_sleeps):
    assert sleep_for(IDEAL, 10**9) == 0.0
    assert recorded_sleeps == []


def test_sleep_for_really_waits():
    # Wall-clock: only a lower bound holds on a loaded machine (the exact figure is checked above).
    start = time.monotonic()
    sleep_for(LinkSpec(latency_ms=30, bandwidth_mbps=8), 10_000)
    assert time.monotonic() - start >= 0.040
