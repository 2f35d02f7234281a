"""Every remote wait of a Ray pipeline, with a deadline, and the replacement of failed workers.

A wait that fails because a worker died or missed the deadline raises :class:`RemoteError` naming
the worker (``role``), which the scheduler's recovery reads; :meth:`RemoteCalls.replace` starts a
fresh actor like a failed one.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import ray

from specmesh.runtime.interfaces import WorkerFailure

log = logging.getLogger(__name__)

# Default deadline of every remote wait (model loading waits longer: see LOAD_TIMEOUT_S).
ROUND_TIMEOUT_S = 300.0
LOAD_TIMEOUT_S = 900.0
# A live actor answers an empty call in ~1 ms (a loaded machine: tens); one that does not within
# this is dead, stuck or unreachable, and is replaced.
ALIVE_PING_S = 2.0
_REASON_CHARS = 400  # how much of a Ray error a RemoteError quotes

class RemoteError(WorkerFailure):
    """A round failed: a worker died or missed its deadline (``role`` names it), or answered with
    an error message (``role`` None: the worker lives on)."""


@dataclass
class Worker:
    """One actor and what is known of where it runs (filled by its readiness answer)."""

    role: str  # "draft", "stage0", ...
    handle: object  # the Ray actor handle
    info: dict = field(default_factory=dict)  # pid, node_id, ip, threads, ...
    spawn: object = None  # () -> a new actor handle like this one (recovery)

    def __str__(self) -> str:
        if not self.info:
            return self.role
        return f"{self.role} (pid {self.info['pid']} on node {self.info['node_id'][:8]})"


@dataclass(frozen=True)
class Pending:
    """A proposal in flight: the draft actor's ``ObjectRef`` and the round it belongs to."""

    ref: ray.ObjectRef
    session_id: str
    round: int


def _reason(exc: BaseException) -> str:
    """The first and last lines of a Ray error (what died, and why), shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " | ".join(dict.fromkeys(lines[:1] + lines[-1:])) or type(exc).__name__
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


class RemoteCalls:
    """Every remote wait of one pipeline, each with a deadline, and the workers that stopped answering.

    A wait that fails because a worker died or missed the deadline raises :class:`RemoteError` naming
    the worker and marks it unresponsive; the worker leaves that set as soon as it answers again.
    Bookkeeping after such a failure (closing the session, reading the byte counters: the scheduler
    does both in a ``finally``) skips unresponsive workers, so that it neither waits on them again
    nor hides the round's error behind its own.

    Attributes:
        timeout_s: deadline of every wait after start-up (a round's verdict, open, close, counters).
    """

    def __init__(self, timeout_s: float = ROUND_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.unresponsive: set[str] = set()  # roles of workers that died or missed a deadline
        self._replacing = threading.Lock()  # one replacement at a time, whichever session asks

    def call(self, workers: list[Worker], method: str, *args, timeout_s: float | None = None,
             best_effort: bool = False) -> list:
        """Calls ``method(*args)`` on every worker and waits for all answers, with the deadline.

        Returns:
            One answer per worker; with ``best_effort``, None for a worker that is skipped (already
            unresponsive) or fails, which is logged instead of raised.

        Raises:
            RemoteError: a worker died or did not answer in time (unless ``best_effort``).
            The worker's own exception, when the method raised it (the worker keeps serving).
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        asked = [w for w in workers if not (best_effort and w.role in self.unresponsive)]
        refs = {w.role: getattr(w.handle, method).remote(*args) for w in asked}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout) if refs else ([], [])
        ready = set(ready)
        answers, failures = [], []
        for w in workers:
            ref = refs.get(w.role)
            if ref is None:
                answers.append(None)
                continue
            try:
                if ref not in ready:
                    raise RemoteError(f"{w} did not answer {method} within {timeout:g} s", w.role)
                answers.append(ray.get(ref))
                self.unresponsive.discard(w.role)
            except (RemoteError, ray.exceptions.RayActorError) as exc:
                self.unresponsive.add(w.role)
                failures.append(exc if isinstance(exc, RemoteError)
                                else RemoteError(f"{w} died: {_reason(exc)}", w.role, dead=True))
                answers.append(None)
            except ray.exceptions.RayTaskError:  # the method raised; the actor lives on
                if not best_effort:
                    raise
                answers.append(None)
        if failures and not best_effort:
            raise failures[0]
        for exc in failures:
            log.warning("%s (ignored: cleaning up after a failure)", exc)
        return answers

    def round_failed(self, chain: list[tuple[Worker, ray.ObjectRef]], session_id: str, rnd: int,
                     exc: BaseException) -> RemoteError:
        """The error of a round whose verdict did not come: names the worker of the chain that died
        or failed (the first such), else the first that is still silent, and marks it unresponsive.

        A worker's answer is looked at where it lies (``fetch_local=False``): the driver never
        fetches the frames that actors hand to each other, so waiting for them to arrive here would
        call a worker that answered long ago silent.
        """
        where = f"round {rnd} of session {session_id}"
        silent = None
        for worker, ref in chain:
            done, _ = ray.wait([ref], timeout=0, fetch_local=False)
            if not done:
                silent = silent or worker
                continue
            try:
                ray.get(ref, timeout=self.timeout_s)
            except ray.exceptions.RayActorError as err:
                self.unresponsive.add(worker.role)
                return RemoteError(f"{where}: {worker} died: {_reason(err)}", worker.role, dead=True)
            except ray.exceptions.GetTimeoutError:
                silent = silent or worker
            except ray.exceptions.RayError as err:
                return RemoteError(f"{where}: {worker} failed: {_reason(err)}", worker.role)
        if silent is not None:
            self.unresponsive.add(silent.role)
            return RemoteError(f"{where}: no verdict within {self.timeout_s:g} s; {silent} has not "
                               f"answered (stuck, or its node is unreachable)", silent.role)
        return RemoteError(f"{where}: {_reason(exc)}")

    def replace(self, worker: Worker) -> bool:
        """Kills ``worker``'s actor and starts a fresh one like it (its weights reloaded from the
        node's cache), unless it answers a ping at once (another session replaced it already).

        Returns:
            True when a live worker is in place; False when no replacement could start.
        """
        with self._replacing:
            try:
                ray.get(worker.handle.ready.remote(), timeout=ALIVE_PING_S)
                self.unresponsive.discard(worker.role)
                return True
            except Exception:  # dead, stuck or unreachable: replace it
                pass
            if worker.spawn is None:
                return False
            try:
                ray.kill(worker.handle, no_restart=True)
            except Exception:  # already gone
                pass
            try:
                handle = worker.spawn()
                info = ray.get(handle.ready.remote(), timeout=LOAD_TIMEOUT_S)
            except Exception as err:  # no node to host it, or it died loading: the failure stands
                log.warning("could not replace %s: %s", worker, _reason(err))
                return False
            worker.handle, worker.info = handle, info
            self.unresponsive.discard(worker.role)
            log.warning("replaced %s", worker)
            return True
