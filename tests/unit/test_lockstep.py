"""The round gate (runtime/lockstep.py), the batcher's forgetting of closed sessions and the split
of a batch by fed counts (actors/batched.py::padding_groups)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from specmesh.actors import batched, hf, tiny
from specmesh.runtime import batching
from specmesh.runtime.batching import MicroBatcher
from specmesh.runtime.lockstep import RoundGate


def _arrive_later(gate: RoundGate, member, delay_s: float, log: list) -> threading.Thread:
    def run():
        time.sleep(delay_s)
        gate.arrive(member)
        log.append((member, time.monotonic()))

    t = threading.Thread(target=run)
    t.start()
    return t


def test_members_go_together_once_all_have_arrived():
    gate = RoundGate()
    for m in "abc":
        gate.join(m)
    log: list = []
    threads = [_arrive_later(gate, m, d, log) for m, d in zip("abc", (0.0, 0.05, 0.2))]
    for t in threads:
        t.join(5)
    assert sorted(m for m, _ in log) == ["a", "b", "c"]
    times = [at for _, at in log]
    assert max(times) - min(times) < 0.05  # a and b waited for c
    assert gate.stats() == {"cycles": 1, "sessions": 3, "members": 3}


def test_a_member_that_leaves_completes_the_others_cycle():
    gate = RoundGate()
    gate.join("a")
    gate.join("b")
    log: list = []
    t = _arrive_later(gate, "a", 0.0, log)
    time.sleep(0.1)
    assert not log  # a waits for b
    gate.leave("b")
    t.join(5)
    assert [m for m, _ in log] == ["a"]


def test_a_member_that_does_not_come_is_waited_for_at_most_the_patience():
    gate = RoundGate(patience=1.0)
    gate.join("a")
    gate.join("slow")
    gate.observe(0.1)  # rounds take 0.1 s: wait at most that long
    t0 = time.monotonic()
    gate.arrive("a")
    waited = time.monotonic() - t0
    assert 0.08 <= waited < 1.0


def test_non_members_and_zero_patience_never_wait():
    gate = RoundGate()
    gate.join("a")
    t0 = time.monotonic()
    gate.arrive("stranger")
    RoundGate(patience=0).arrive("a")
    assert time.monotonic() - t0 < 0.05
    with pytest.raises(ValueError, match="patience"):
        RoundGate(patience=-1)


def test_a_late_member_joins_the_next_cycle_with_the_others():
    gate = RoundGate(patience=1.0)
    gate.join("a")
    gate.join("b")
    gate.observe(0.05)
    gate.arrive("a")  # b misses the cycle: a goes after the patience
    log: list = []
    tb = _arrive_later(gate, "b", 0.0, log)  # b arrives first in the next cycle, waits for a
    time.sleep(0.02)
    ta = _arrive_later(gate, "a", 0.0, log)
    tb.join(5)
    ta.join(5)
    assert sorted(m for m, _ in log) == ["a", "b"]
    assert gate.stats()["cycles"] == 2


def test_the_batcher_stops_waiting_for_a_forgotten_caller(monkeypatch):
    runs: list[int] = []

    def fn(items):
        runs.append(len(items))
        time.sleep(0.02)
        return items

    b = MicroBatcher(fn, max_batch=4, linger=100.0)
    monkeypatch.setattr(batching, "MAX_LINGER_S", 0.3)
    assert b.submit(1, caller="a") == 1  # first batch: nothing to wait for yet
    b.submit(2, caller="b")  # b is active now: later batches wait for it
    t0 = time.monotonic()
    b.submit(3, caller="a")
    assert time.monotonic() - t0 >= 0.25  # lingered for b
    b.forget("b")
    t0 = time.monotonic()
    b.submit(4, caller="a")
    assert time.monotonic() - t0 < 0.2  # b is gone: no linger


@pytest.mark.parametrize("counts, groups", [
    ([], []),
    ([5, 5, 5], [[0, 1, 2]]),
    ([5, 200, 4, 5], [[0, 2, 3], [1]]),
    ([200, 180], [[0, 1]]),  # prefills together: similar lengths pad little
    ([30, 2, 2], [[0, 1, 2]]),  # not long enough to be worth a forward of its own
    ([300], [[0]]),
])
def test_padding_groups(counts, groups):
    assert batched.padding_groups(counts) == groups


def test_forward_grouped_equals_each_session_alone(tmp_path):
    torch.manual_seed(0)
    model = hf.load_stage(tiny.materialise("tiny", str(tmp_path)), dtype=torch.float32)
    counts = (3, 60, 2)
    caches_a = [model.new_cache() for _ in counts]
    caches_b = [model.new_cache() for _ in counts]
    ids = [torch.randint(0, model.vocab_size, (n,)) for n in counts]
    fed = [batched.Fed(c, torch.arange(n), input_ids=i) for c, n, i in zip(caches_a, counts, ids)]
    grouped = batched.forward_grouped(model, fed)
    for c, n, i, h in zip(caches_b, counts, ids, grouped):
        alone = batched.forward_alone(model, batched.Fed(c, torch.arange(n), input_ids=i))
        assert h.shape == alone.shape
        assert (h - alone).abs().max() <= 1e-5 * max(1.0, float(alone.abs().max()))
