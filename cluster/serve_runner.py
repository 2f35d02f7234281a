"""Runs the server's generations: one worker thread per session, a bounded number at once.

The engine runs concurrent sessions from threads (as :meth:`SpecMesh.generate_many` does); each
admitted request gets a thread from a pool of ``max_running``, at most ``max_waiting`` more wait for
one, and beyond that a request is refused at once (:class:`Overloaded`) instead of queueing without
bound. The thread iterates the session's rounds and hands each one to the event loop; a cancelled
session (its client went away) is closed after the round in flight, which frees its caches on every
worker.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from specmesh.runtime.api import SpecMesh
from specmesh.runtime.stats import SessionStats

from .serve_metrics import ServeMetrics

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """Every running slot and every waiting slot is taken."""


@dataclass(frozen=True)
class Finished:
    """The end of a session: what it generated, why it stopped, its statistics."""

    output_ids: list[int]
    finish_reason: str
    stats: SessionStats


def open_generation(engine: SpecMesh, prompt_ids: Sequence[int], overrides: dict[str, Any]):
    """A not-yet-started generation of ``prompt_ids``: checks every override and the prompt like
    the engine does, without contacting a worker.

    Raises:
        ValueError / TypeError: a bad override or prompt, naming the value.
    """
    return engine.generation(list(prompt_ids), **overrides)


class Session:
    """One admitted request. Its events, ``("round", new_ids)`` then ``("done", Finished)`` or
    ``("error", exception)``, arrive on the event loop as the worker thread produces them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self.finished = threading.Event()  # set once the worker thread is done with the session

    def cancel(self) -> None:
        """Asks the worker thread to close the session after the round in flight (idempotent)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    async def next_event(self, timeout: float | None = None) -> tuple[str, Any] | None:
        """The next event, or None after ``timeout`` seconds without one."""
        if timeout is None:
            return await self._queue.get()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def push(self, kind: str, value: Any) -> None:
        """Thread-safe: queues an event for the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed (server stopping): nobody listens any more
            self._cancel.set()


class SessionRunner:
    """Admits sessions and runs each in a worker thread.

    Args:
        engine: the loaded engine.
        metrics: the server's metrics.
        max_running: sessions generating at once.
        max_waiting: admitted sessions waiting for a running slot; more are refused.
    """

    def __init__(self, engine: SpecMesh, metrics: ServeMetrics, max_running: int = 16,
                 max_waiting: int = 64) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.metrics = metrics
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._pool = ThreadPoolExecutor(max_running, thread_name_prefix="specmesh-serve")
        self._lock = threading.Lock()
        self._running = 0
        self._waiting = 0
        self._live: set[Session] = set()

    def load(self) -> tuple[int, int]:
        """``(running, waiting)`` sessions now."""
        with self._lock:
            return self._running, self._waiting

    def submit(self, generation, arrival: float) -> Session:
        """Admits a generation built by :func:`open_generation`; its events start arriving soon.

        Raises:
            Overloaded: ``max_running + max_waiting`` sessions are already admitted.
        """
        with self._lock:
            if self._running + self._waiting >= self.max_running + self.max_waiting:
                self.metrics.rejected.inc()
                raise Overloaded(
                    f"server full: {self._running} requests running and {self._waiting} waiting "
                    f"(limits {self.max_running} and {self.max_waiting}); retry later"
                )
            self._waiting += 1
            session = Session(asyncio.get_running_loop())
            self._live.add(session)
        meter = self.metrics.session(arrival, len(generation.prompt))
        self._pool.submit(self._run, session, generation, meter)
        return session

    def close(self, timeout_s: float = 30.0) -> None:
        """Cancels every session and waits (up to ``timeout_s``) for their threads to close them."""
        with self._lock:
            live = list(self._live)
        for s in live:
            s.cancel()
        deadline = time.monotonic() + timeout_s
        for s in live:
            s.finished.wait(max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, session: Session, generation, meter) -> None:
        with self._lock:
            self._waiting -= 1
            self._running += 1
        try:
            if session.cancelled:  # the client left while the request waited: nothing was opened
                meter.cancel()
                return
            self._iterate(session, generation, meter)
        except Exception as exc:
            log.exception("session %s failed", getattr(generation, "session_id", "?"))
            meter.fail()
            session.push("error", exc)
        finally:
            with self._lock:
                self._running -= 1
                self._live.discard(session)
            session.finished.set()

    def _iterate(self, session: Session, generation, meter) -> None:
        rounds = iter(generation)
        try:
            for new in rounds:
                meter.progress(list(new), generation.stats)
                session.push("round", list(new))
                if session.cancelled:
                    break
        finally:
            close = getattr(rounds, "close", None)
            if close is not None:
                close()  # ends the session on every worker, also when a round raised
        if session.cancelled and generation.finish_reason is None:
            meter.cancel()
            return
        meter.finish(generation.finish_reason)
        session.push("done", Finished(list(generation.output_ids), generation.finish_reason, generation.stats))
