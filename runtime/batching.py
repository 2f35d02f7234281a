"""A micro-batcher: concurrent callers' items run together through one batch function.

Sessions in flight at once each hand a worker one item per round (a stage's message, a draft's
forward). Run one at a time, they queue; run together, one forward serves them all. The policy: items
that arrive while a batch runs gather, and the next batch takes up to ``max_batch`` of them, oldest
first. An item that finds the worker idle runs at once when it is the only caller about; when other
callers are about (``active``: distinct callers, e.g. sessions, that submitted within the last
few batch times or :data:`ACTIVE_MIN_S`, and have not said goodbye with :meth:`forget`), it waits
for them, at most ``linger`` times the last batch's run time (capped at ``MAX_LINGER_S``):
sessions that start their rounds together (``runtime/lockstep.py``) reach each worker of a pipeline
a few milliseconds apart, one after the other's codec and sampling, and run as one batch instead of
in ones and twos. The window is long because a stage sees a session once per round, and a round
of sixteen batched sessions takes seconds. No leader thread of its own: the first caller that finds
the worker idle runs the batch for everyone in it, then hands over.

Errors stay with their item: the batch function answers an exception in an item's place to fail
that item only; if it raises as a whole, every item of that batch is retried alone, so one bad
item cannot fail its neighbours.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable, Generic, Hashable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

BatchFn = Callable[[Sequence[T]], Sequence["R | BaseException"]]

MAX_LINGER_S = 0.5  # the longest an idle worker waits for callers it expects
ACTIVE_WINDOW = 8.0  # a caller counts as active for this many batch run times after it submitted,
ACTIVE_MIN_S = 5.0  # and at least this many seconds (unless forgotten)


class _Slot(Generic[T]):
    __slots__ = ("item", "done", "value", "error")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = False
        self.value = None
        self.error: BaseException | None = None


class MicroBatcher(Generic[T, R]):
    """Gathers items submitted from several threads into batches for ``fn``.

    Args:
        fn: runs a batch: items -> one result per item, in order; an exception instance in an
            item's place fails that item only (it is raised in its submitter's thread).
        max_batch: most items per call of ``fn`` (1: every item alone, in arrival order).
        linger: how long an idle worker may wait for callers it expects, in units of the last
            batch's run time (0: never wait).

    Thread-safe. ``fn`` runs in one submitter's thread at a time, never concurrently with itself.
    """

    def __init__(self, fn: BatchFn, max_batch: int, linger: float = 1.0) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not linger >= 0:
            raise ValueError(f"linger must be >= 0, got {linger!r}")
        self.fn = fn
        self.max_batch = max_batch
        self.linger = linger
        self._callers: dict[Hashable, float] = {}  # caller -> when it last submitted
        self._run_s = 0.0  # the last batch's run time
        self._cond = threading.Condition()
        self._pending: list[_Slot[T]] = []
        self._busy = False
        self._sizes: Counter[int] = Counter()

    def submit(self, item: T, caller: Hashable | None = None) -> R:
        """Blocks until ``item``'s batch has run; returns its result or raises its exception.

        ``caller`` names who submits (a session id), for the count of callers active lately; None
        counts the submitting thread (wrong under a thread pool, where one session's items come from
        many threads)."""
        slot = _Slot(item)
        with self._cond:
            self._pending.append(slot)
            self._callers[threading.get_ident() if caller is None else caller] = time.monotonic()
            self._cond.notify_all()  # a lingering caller may be waiting for this one
            while not slot.done:
                if self._busy:
                    self._cond.wait()
                    continue
                self._gather()
                if slot.done or self._busy:  # another caller ran (or runs) this item's batch
                    continue
                self._busy = True
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                self._sizes[len(batch)] += 1
                self._cond.release()
                t0 = time.monotonic()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._run_s = time.monotonic() - t0
                    self._busy = False
                    self._cond.notify_all()
        if slot.error is not None:
            raise slot.error
        return slot.value

    def forget(self, caller: Hashable) -> None:
        """``caller`` (a closed session) submits no more: nobody waits for it."""
        with self._cond:
            self._callers.pop(caller, None)

    def _gather(self) -> None:
        """Holding the lock with the worker idle: waits (bounded) until the callers active lately
        have submitted, or ``max_batch`` items are pending."""
        if self.linger <= 0 or self.max_batch == 1 or self._run_s <= 0:
            return
        now = time.monotonic()
        horizon = now - max(ACTIVE_WINDOW * self._run_s, ACTIVE_MIN_S)
        self._callers = {t: at for t, at in self._callers.items() if at >= horizon}
        want = min(self.max_batch, len(self._callers))
        deadline = now + min(MAX_LINGER_S, self.linger * self._run_s)
        while len(self._pending) < want and not self._busy:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def stats(self) -> dict[int, int]:
        """How many batches ran of each size: ``{size: count}``."""
        with self._cond:
            return dict(self._sizes)

    def _run(self, batch: list[_Slot[T]]) -> None:
        try:
            results = list(self.fn([s.item for s in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"batch function answered {len(results)} results for {len(batch)} items")
        except Exception as exc:
            if len(batch) == 1:
                results = [exc]
            else:  # retry each item alone: only the item at fault fails
                results = [_as_result(self.fn, s.item) for s in batch]
        for slot, result in zip(batch, results):
            if isinstance(result, BaseException):
                slot.error = result
            else:
                slot.value = result
            slot.done = True


def _as_result(fn: BatchFn, item):
    """``fn`` over ``item`` alone: its result, or the exception it raised or answered."""
    try:
        (result,) = fn([item])
        return result
    except Exception as exc:
        return exc
