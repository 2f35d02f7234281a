"""Byte accounting: totals, per-session counts, merging, bytes per token."""
from __future__ import annotations

import threading

import pytest

from specmesh.runtime.traffic import DOWNLINK, UPLINK, TrafficMeter, TrafficSnapshot, per_generated_token


def test_totals_by_direction_and_link():
    m = TrafficMeter()
    m.record("device->edge1", UPLINK, 100)
    m.record("edge1->edge2", UPLINK, 1000)
    m.record("edge2->device", DOWNLINK, 40)
    snap = m.snapshot()
    assert snap.total(UPLINK).bytes == 1100 and snap.total(UPLINK).messages == 2
    assert snap.total(UPLINK, ["device->edge1"]).bytes == 100
    assert snap.total(DOWNLINK).bytes == 40 and snap.total().bytes == 1140
    assert per_generated_token(snap, 10) == {"uplink": 110.0, "downlink": 4.0}


def test_sessions_are_counted_apart():
    m = TrafficMeter()
    m.record("up", UPLINK, 10, session="a")
    m.record("up", UPLINK, 20, session="b")
    m.record("up", UPLINK, 5)
    assert m.snapshot("a").total().bytes == 10 and m.snapshot("b").total().bytes == 20
    assert m.snapshot().total().bytes == 35
    m.forget("a")
    assert m.snapshot("a").total().bytes == 0 and m.snapshot().total().bytes == 35


def test_merge_and_threads():
    m = TrafficMeter()

    def send():
        for _ in range(1000):
            m.record("l", UPLINK, 3)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.snapshot().total().bytes == 12000
    merged = m.snapshot().merged(TrafficSnapshot({("l", UPLINK): m.snapshot().total()}))
    assert merged.total().messages == 8000


def test_bad_input_named():
    m = TrafficMeter()
    with pytest.raises(ValueError, match="direction"):
        m.record("l", "sideways", 1)
    with pytest.raises(ValueError, match="nbytes must be >= 0, got -1"):
        m.record("l", UPLINK, -1)
    with pytest.raises(ValueError, match="generated_tokens must be >= 1"):
        m.snapshot().bytes_per_token(0, UPLINK)
