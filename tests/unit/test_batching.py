"""The micro-batcher with a fake batch function: concurrency, order, error isolation, max_batch."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from specmesh.runtime.batching import MicroBatcher


class Fake:
    """Doubles each item; records every batch; the first batch waits on ``gate`` so others gather."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list] = []
        self.gate = gate
        self.running = 0
        self.overlapped = False
        self.lock = threading.Lock()

    def __call__(self, items):
        with self.lock:
            self.running += 1
            self.overlapped |= self.running > 1
        try:
            if self.gate is not None and not self.batches:
                self.batches.append(list(items))
                assert self.gate.wait(10)
            else:
                self.batches.append(list(items))
            time.sleep(0.01)
            return [ValueError(f"bad {x}") if x == "bad" else x * 2 for x in items]
        finally:
            with self.lock:
                self.running -= 1


def _submit_all(batcher, items, workers=None):
    with ThreadPoolExecutor(workers or len(items)) as pool:
        futures = [pool.submit(batcher.submit, x) for x in items]
        return [f.exception() or f.result() for f in futures]


def _after_first_batch(fn: Fake, gate: threading.Event, batcher, items, max_wait=5.0):
    """Submits ``items[0]`` alone, waits until its batch runs, submits the rest, then opens the gate."""
    with ThreadPoolExecutor(len(items)) as pool:
        first = pool.submit(batcher.submit, items[0])
        deadline = time.monotonic() + max_wait
        while not fn.batches and time.monotonic() < deadline:
            time.sleep(0.001)
        rest = [pool.submit(batcher.submit, x) for x in items[1:]]
        while len(batcher._pending) < len(items) - 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        gate.set()
        return [f.result() for f in [first, *rest]]


def test_items_arriving_during_a_batch_run_together_next():
    gate = threading.Event()
    fn = Fake(gate)
    batcher = MicroBatcher(fn, max_batch=16)
    out = _after_first_batch(fn, gate, batcher, list(range(9)))
    assert out == [2 * x for x in range(9)]  # every caller gets its own result
    assert fn.batches[0] == [0] and sorted(fn.batches[1]) == list(range(1, 9))
    assert fn.batches[1] == sorted(fn.batches[1])  # oldest first
    assert batcher.stats() == {1: 1, 8: 1}
    assert not fn.overlapped  # the batch function never runs beside itself


def test_max_batch_caps_each_batch_oldest_first():
    gate = threading.Event()
    fn = Fake(gate)
    batcher = MicroBatcher(fn, max_batch=3)
    out = _after_first_batch(fn, gate, batcher, list(range(8)))
    assert out == [2 * x for x in range(8)]
    assert [len(b) for b in fn.batches] == [1, 3, 3, 1]
    assert [x for b in fn.batches for x in b] == list(range(8))


def test_max_batch_one_runs_every_item_alone():
    fn = Fake()
    batcher = MicroBatcher(fn, max_batch=1)
    assert _submit_all(batcher, list(range(6))) == [2 * x for x in range(6)]
    assert all(len(b) == 1 for b in fn.batches) and batcher.stats() == {1: 6}
    assert not fn.overlapped


def test_an_answered_error_fails_only_its_item():
    gate = threading.Event()
    fn = Fake(gate)
    batcher = MicroBatcher(fn, max_batch=8)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batcher.submit, 1)
        while not fn.batches:
            time.sleep(0.001)
        others = [pool.submit(batcher.submit, x) for x in (2, "bad", 3)]
        while len(batcher._pending) < 3:
            time.sleep(0.001)
        gate.set()
        assert first.result() == 2 and others[0].result() == 4 and others[2].result() == 6
        with pytest.raises(ValueError, match="bad bad"):
            others[1].result()
    assert fn.batches[1] == [2, "bad", 3]  # one batch: the error did not split it


def test_a_batch_that_raises_is_retried_item_by_item():
    calls = []

    def fn(items):
        calls.append(list(items))
        if len(items) > 1 or items[0] == "poison":
            raise RuntimeError(f"cannot run {items}")
        return [items[0] + "!"]

    batcher = MicroBatcher(fn, max_batch=8)
    batcher._busy = True  # hold the worker so that all three gather into one batch
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(batcher.submit, x) for x in ("a", "poison", "b")]
        while len(batcher._pending) < 3:
            time.sleep(0.001)
        with batcher._cond:
            batcher._busy = False
            batcher._cond.notify_all()
        assert futures[0].result() == "a!" and futures[2].result() == "b!"
        with pytest.raises(RuntimeError, match=r"cannot run \['poison'\]"):
            futures[1].result()
    assert calls[0] == ["a", "poison", "b"] and sorted(map(tuple, calls[1:])) == [("a",), ("b",), ("poison",)]


def test_a_wrong_number_of_results_is_an_error_per_item():
    batcher = MicroBatcher(lambda items: [], max_batch=4)
    with pytest.raises(RuntimeError, match="answered 0 results for 1 items"):
        batcher.submit(1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_max_batch_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=f"max_batch must be an integer >= 1, got {bad!r}"):
        MicroBatcher(lambda items: items, bad)


def test_many_threads_each_get_their_own_result():
    fn = Fake()
    batcher = MicroBatcher(fn, max_batch=5)
    items = list(range(200))
    assert _submit_all(batcher, items, workers=32) == [2 * x for x in items]
    assert max(len(b) for b in fn.batches) <= 5 and sum(len(b) for b in fn.batches) == 200
    assert sum(n * c for n, c in batcher.stats().items()) == 200 and not fn.overlapped


def _rounds(batcher, threads: int, rounds: int, seed: int) -> None:
    """``threads`` sessions, each submitting once per round and then 'working' a random while, so
    that they drift out of step (as sessions do across the workers of a pipeline)."""
    import random

    def session(k):
        rng = random.Random(seed * 100 + k)
        for r in range(rounds):
            batcher.submit((k, r))
            time.sleep(rng.uniform(0.0, 0.03))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(session, range(threads)))


def _mean_batch(stats: dict[int, int]) -> float:
    return sum(k * v for k, v in stats.items()) / sum(stats.values())


def test_an_idle_worker_waits_for_the_callers_it_expects():
    slow = lambda items: (time.sleep(0.02), list(items))[1]  # noqa: E731
    eager, lingering = MicroBatcher(slow, max_batch=16, linger=0.0), MicroBatcher(slow, max_batch=16)
    _rounds(eager, 6, 12, seed=1)
    _rounds(lingering, 6, 12, seed=1)
    assert _mean_batch(lingering.stats()) >= 1.3 * _mean_batch(eager.stats()), (eager.stats(), lingering.stats())


def test_a_lone_caller_never_waits():
    slow = lambda items: (time.sleep(0.02), list(items))[1]  # noqa: E731
    batcher = MicroBatcher(slow, max_batch=16)
    t0 = time.monotonic()
    for i in range(10):
        assert batcher.submit(i) == i
    assert time.monotonic() - t0 < 10 * 0.02 * 1.6  # no linger: nobody else is about
    assert batcher.stats() == {1: 10}


def test_linger_must_not_be_negative():
    with pytest.raises(ValueError, match="linger"):
        MicroBatcher(lambda items: items, max_batch=4, linger=-1)
