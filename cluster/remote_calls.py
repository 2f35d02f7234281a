"""Every remote wait of a Ray pipeline, with a deadline, and the replacement of failed workers.

A wait that fails because a worker died or missed the deadline raises :class:`RemoteError` naming
the worker (``role``), which the scheduler's recovery reads. A round waits hop by hop when a per-hop
deadline is set (:meth:`RemoteCalls.await_chain`): a stalled link or a stuck worker fails the hop's
receiver within that hop's deadline. :meth:`RemoteCalls.replace` starts a fresh actor like a failed
one: on its own node while that node lives, else on a node that can stand in for it (its ``stand_in``),
else not at all (the generation then ends with its committed tokens).
"""
from __future__ import annotations

import logging
import threading
import time
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
# How often a replacement that is not up yet looks at whether its node is still alive (Ray's own
# health check decides when a node is dead: RAY_health_check_period_ms x ..._failure_threshold).
NODE_POLL_S = 0.5
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
    spawn: object = None  # () -> a new actor handle like this one, on its own node (recovery)
    stand_in: object = None  # () -> a new actor like this one on another node (its node is gone)
    needs: dict = field(default_factory=dict)  # Ray resources a node must offer to stand in

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
        hop_timeout_s: deadline of each hop of a round, from the previous hop's answer (None: the
            round's deadline alone).
    """

    def __init__(self, timeout_s: float = ROUND_TIMEOUT_S, hop_timeout_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.hop_timeout_s = hop_timeout_s
        self.unresponsive: set[str] = set()  # roles of workers that died or missed a deadline
        # One replacement of a worker at a time, whichever session asks; different workers' apart:
        # a stage that cannot come back is reported at once, not after the draft's reload.
        self._replacing: dict[str, threading.Lock] = {}
        self._locks = threading.Lock()  # guards _replacing

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

    def await_chain(self, chain: list[tuple[Worker, ray.ObjectRef]], session_id: str, rnd: int) -> bytes:
        """The last hop's answer (the verdict frame) of a round whose messages travel ``chain``, one
        ``(receiver, its answer)`` per hop in order, within the round's deadline and, when
        ``hop_timeout_s`` is set, each hop's: the hop's clock starts when the previous hop answered.

        Raises:
            RemoteError: naming the receiver of the first hop that missed its deadline (a stalled
                link, a stuck worker or an unreachable node), or the worker that died.
        """
        return self.await_chains([chain], session_id, rnd)[0][0]

    def await_chains(self, chains: list[list[tuple[Worker, ray.ObjectRef]]], session_id: str,
                     rnd: int) -> list[tuple[bytes, float]]:
        """:meth:`await_chain` for several chains of one round in flight at once (SpecFed: one per
        federated worker), waited on together: one round deadline for all, each hop its own clock.

        Returns:
            per chain, its last answer and the ``time.monotonic()`` at which it was seen ready.

        Raises:
            RemoteError: as :meth:`await_chain`, for the first chain found failing or late.
        """
        deadline = time.monotonic() + self.timeout_s
        if self.hop_timeout_s is not None:
            self._await_hops(chains, session_id, rnd, deadline)
        return self._await_last(chains, session_id, rnd, deadline)

    def _await_hops(self, chains: list[list[tuple[Worker, ray.ObjectRef]]], session_id: str, rnd: int,
                    deadline: float) -> None:
        """Every hop of every chain, each within ``hop_timeout_s`` of the answer before it; returns
        when all have answered or the round's own deadline comes first (:meth:`_await_last` says so)."""
        hop_s = self.hop_timeout_s
        at = [0] * len(chains)  # per chain, the hop it waits for
        since = [time.monotonic()] * len(chains)  # when that hop's clock started
        while True:
            waiting = [c for c, chain in enumerate(chains) if at[c] < len(chain)]
            if not waiting:
                return
            first = min(waiting, key=lambda c: since[c])  # the hop whose deadline comes first
            now = time.monotonic()
            left, hop_left = deadline - now, since[first] + hop_s - now
            of_ref: dict[ray.ObjectRef, list[int]] = {}  # chains may share a hop (the draft's)
            for c in waiting:
                of_ref.setdefault(chains[c][at[c]][1], []).append(c)
            # Where the answer lies, not fetched: frames go actor to actor (see round_failed).
            done, _ = ray.wait(list(of_ref), num_returns=1, timeout=max(0.0, min(hop_left, left)),
                               fetch_local=False)
            if done:
                t = time.monotonic()
                for ref in done:
                    for c in of_ref[ref]:
                        at[c], since[c] = at[c] + 1, t
                continue
            if left <= hop_left:
                return  # the round's own deadline came first
            k = at[first]
            worker = chains[first][k][0]
            self.unresponsive.add(worker.role)
            sender = chains[first][k - 1][0].role if k else "the driver"
            raise RemoteError(f"round {rnd} of session {session_id}: the hop {sender} -> {worker} "
                              f"missed its {hop_s:g} s deadline ({worker.role} is stuck, "
                              "its link stalled, or its node is unreachable)", worker.role)

    def _await_last(self, chains: list[list[tuple[Worker, ray.ObjectRef]]], session_id: str, rnd: int,
                    deadline: float) -> list[tuple[bytes, float]]:
        """Every chain's last answer, fetched, by ``deadline``; the first chain that fails (a worker
        died, or none answers in time) raises :meth:`round_failed` at once, not at the deadline."""
        out: list = [None] * len(chains)
        pending = {chain[-1][1]: c for c, chain in enumerate(chains)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                c = min(pending.values())
                late = ray.exceptions.GetTimeoutError(f"no answer within {self.timeout_s:g} s")
                raise self.round_failed(chains[c], session_id, rnd, late)
            for ref in done:
                c = pending.pop(ref)
                try:
                    out[c] = (ray.get(ref, timeout=max(0.0, deadline - time.monotonic())), time.monotonic())
                except ray.exceptions.RayError as exc:  # GetTimeoutError included
                    raise self.round_failed(chains[c], session_id, rnd, exc) from None
        return out

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

        The new actor starts on the worker's own node while Ray counts that node alive; once Ray
        declares it dead, on a live node that offers ``worker.needs`` (``worker.stand_in``); with no
        stand-in, or no live node that offers its resources, the failure stands.

        Returns:
            True when a live worker is in place; False when no replacement could start.
        """
        with self._locks:
            lock = self._replacing.setdefault(worker.role, threading.Lock())
        with lock:
            try:
                ray.get(worker.handle.ready.remote(), timeout=ALIVE_PING_S)
                self.unresponsive.discard(worker.role)
                return True
            except Exception:  # dead, stuck or unreachable: replace it
                pass
            if worker.spawn is None:
                return False
            _kill(worker.handle)
            deadline = time.monotonic() + LOAD_TIMEOUT_S
            while time.monotonic() < deadline:
                gone = not _node_alive(worker.info.get("node_id"))
                if gone and (worker.stand_in is None or not _offered(worker.needs)):
                    log.warning("cannot replace %s: its node is gone and no live node can stand in (%s)",
                                worker, f"needs {worker.needs}" if worker.stand_in else "it has no stand-in")
                    return False
                try:
                    handle = (worker.stand_in if gone else worker.spawn)()
                    info = self._await_ready(handle, worker.info.get("node_id"), gone, deadline)
                except Exception as err:  # it died loading: the failure stands
                    log.warning("could not replace %s: %s", worker, _reason(err))
                    return False
                if info is not None:
                    worker.handle, worker.info = handle, info
                    self.unresponsive.discard(worker.role)
                    log.warning("replaced %s", worker)
                    return True
                _kill(handle)  # its node died while it started: try a stand-in
            return False

    @staticmethod
    def _await_ready(handle, node_id: str | None, elsewhere: bool, deadline: float) -> dict | None:
        """The new actor's readiness answer; None when the node it waits for died meanwhile (a
        replacement on its own node) or when it is not up by ``deadline``."""
        ref = handle.ready.remote()
        while time.monotonic() < deadline:
            done, _ = ray.wait([ref], timeout=NODE_POLL_S)
            if done:
                return ray.get(ref)
            if not elsewhere and not _node_alive(node_id):
                return None
        return None


def _kill(handle) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # already gone
        pass


def _node_alive(node_id: str | None) -> bool:
    """Whether Ray counts node ``node_id`` alive (None, an unknown node: assumed alive)."""
    if node_id is None:
        return True
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return bool(node["Alive"])
    return True


def _offered(needs: dict) -> bool:
    """Whether some live node offers every resource in ``needs``."""
    return any(node["Alive"] and all(node["Resources"].get(k, 0) >= v for k, v in needs.items())
               for node in ray.nodes())
