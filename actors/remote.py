"""Ray is applied here, and only here, to the plain workers: thin async actor handles.

Each actor loads its own model slice inside its own process, sets its own torch thread count, and
speaks only encoded wire bytes: a message arrives as bytes (fetched by the actor itself from the
sender's node), is delayed by the modelled link, decoded, processed, encoded and returned for the
next actor; across a real network, by reference, so that it does not pass through the driver (see
:func:`_hand_on`). A message that cannot be processed is answered with an
encoded :class:`ErrorMessage` and the actor keeps serving; an error arriving from upstream is passed
on unchanged, so the driver sees the first failure of the round.
"""
from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray
import torch

from specmesh.runtime import codec
from specmesh.runtime.batching import MicroBatcher
from specmesh.runtime.federated import worker_reply
from specmesh.runtime.messages import DraftProposal, ErrorMessage, OpenSession, ProposeRequest, VerifyResult
from specmesh.runtime.traffic import TrafficMeter

from . import hf, lowbit, memory
from .cheap_draft import make_cheaper
from .batched_draft import BatchedDraftWorker, make_draft_worker
from .models import resolve
from .stage import TargetStage


@dataclass(frozen=True)
class WorkerSpec:
    """What an actor loads.

    Attributes:
        model: model name or path (resolved on the actor's own node).
        layers: (start, stop) of the decoder layers held; None = the whole model (the draft).
        dtype: parameter dtype name.
        threads: torch intra-op threads in this actor (never more than ``cores``).
        cache_dir: model cache on the actor's node (None: the node's default).
        cores: the CPU cores the actor pins itself to (its node's, from the topology); None: any.
        weights: the linear layers' weight format (``actors/lowbit.py``).
        draft_head_rows: the draft's restricted head (``actors/cheap_draft.py``).
        batch_sessions: most concurrent sessions whose messages the actor serves with one forward
            (batched rounds, ``runtime/batching.py``); 1 = off.
    """

    model: str
    layers: tuple[int, int] | None
    dtype: str
    threads: int
    cache_dir: str | None = None
    cores: tuple[int, ...] | None = None
    weights: str = "auto"
    draft_head_rows: int = 0
    batch_sessions: int = 1

    def __post_init__(self) -> None:
        if self.cores is not None and self.threads > len(self.cores):
            raise ValueError(f"threads = {self.threads} on {len(self.cores)} core(s) {list(self.cores)}: "
                             "a torch thread without a core of its own stalls the others")


@dataclass(frozen=True)
class InboundLink:
    """The modelled link a message crosses to reach this actor (None: no emulated delay).

    Attributes:
        name: ``src->dst`` for byte accounting.
        direction: "up" (device to stage 0), "stage" (between stages), "down".
        link: the link model (anything with ``delay_s(nbytes)``, e.g. ``cluster.links.LinkSpec``);
            None = no emulated delay (a real network delays the message itself).
    """

    name: str
    direction: str
    link: object | None = None


def _load(spec: WorkerSpec) -> tuple[hf.StageModel, torch.dtype]:
    """The worker's model, loaded on its own cores, and the dtype it computes in."""
    if spec.cores is not None:
        os.sched_setaffinity(0, spec.cores)  # this actor's process computes on its node's cores only
    torch.set_num_threads(spec.threads)
    path = resolve(spec.model, spec.cache_dir)
    layers = range(*spec.layers) if spec.layers else None
    dtype = hf.resolve_dtype(spec.dtype, spec.weights)
    stage = hf.load_stage(path, layers, dtype=lowbit.load_dtype(dtype, spec.weights))
    # a stage's weight format is applied by TargetStage, the draft's here
    return (make_cheaper(stage, spec.weights, spec.draft_head_rows, dtype) if spec.layers is None else stage), dtype


# An error text longer than this is cut, so that the error message itself always encodes.
_ERROR_TEXT_CHARS = 4000


def _error(msg, code: str, text: str) -> bytes:
    """The encoded :class:`ErrorMessage` answering ``msg`` (whatever it was: it may not even have
    decoded, or be a message without a session or round)."""
    msg = getattr(msg, "proposal", msg)
    session_id, rnd = getattr(msg, "session_id", ""), getattr(msg, "round", 0)
    if not isinstance(session_id, str) or not isinstance(rnd, int):
        session_id, rnd = "", 0
    if len(text) > _ERROR_TEXT_CHARS:
        text = text[: _ERROR_TEXT_CHARS - 3] + "..."
    return codec.encode(ErrorMessage(session_id, rnd, code, text))


def _hand_on(frame: bytes, by_reference: bool) -> bytes | ray.ObjectRef:
    """A frame for the next actor: the bytes, or a reference to them in this node's object store.

    An actor's return value is owned by its caller, the driver (on the device node), and Ray keeps a
    small one (under 100 KB: every round's frame but the prompt's) in the driver and inlines it into
    the next task: across a network, the hidden states would cross the device's links twice per hop.
    A reference to an object put here makes the next actor fetch it from this node directly. On one
    machine there is no network to spare and the reference costs ~3 ms a hop, so the bytes go.
    """
    return ray.put(frame) if by_reference else frame


def _opened(data: bytes, vocab_size: int) -> OpenSession:
    """An :class:`OpenSession` from its wire frame: like every SpecMesh message between machines it
    arrives as codec bytes, never as a Python object for Ray to unpickle."""
    if not isinstance(data, bytes):
        raise TypeError(f"open takes an encoded OpenSession frame (bytes), got {type(data).__name__}")
    msg = codec.decode(data, vocab_size=vocab_size)
    if not isinstance(msg, OpenSession):
        raise codec.ProtocolError(f"open takes an OpenSession frame, got {type(msg).__name__}")
    return msg


class _Base:
    def __init__(self, vocab_size: int, inbound: InboundLink | None,
                 outbound: InboundLink | None = None) -> None:
        self.vocab_size = vocab_size
        self.inbound = inbound
        self.outbound = outbound  # the link this actor's output crosses (its encoding time goes there)
        self.traffic = TrafficMeter()

    async def _receive(self, data: bytes):
        delay_s = 0.0
        if self.inbound is not None and self.inbound.link is not None:
            delay_s = self.inbound.link.delay_s(len(data))
            await asyncio.sleep(delay_s)
        t0 = time.perf_counter()
        try:
            msg = codec.decode(data, vocab_size=self.vocab_size)
        except Exception:
            if self.inbound is not None:
                self.traffic.record(self.inbound.name, self.inbound.direction, len(data))
            raise
        if self.inbound is not None:
            session = getattr(getattr(msg, "proposal", msg), "session_id", None) or None
            self.traffic.record(self.inbound.name, self.inbound.direction, len(data), session,
                                delay_s * 1e3, (time.perf_counter() - t0) * 1e3)
        return msg

    def _send(self, msg) -> bytes:
        """Encodes ``msg`` for the next hop, counting the encoding time on the outbound link."""
        t0 = time.perf_counter()
        data = codec.encode(msg)
        if self.outbound is not None:
            session = getattr(getattr(msg, "proposal", msg), "session_id", None) or None
            self.traffic.add_codec_time(self.outbound.name, self.outbound.direction,
                                        (time.perf_counter() - t0) * 1e3, session)
        return data

    def open_sessions(self) -> int:
        """Sessions this worker holds state for (a finished or cancelled one holds none)."""
        return len(self.worker.sessions)

    def traffic_snapshot(self, session: str | None = None):
        return self.traffic.snapshot(session)

    def forget_traffic(self, session: str) -> None:
        self.traffic.forget(session)

    def node_info(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "threads": torch.get_num_threads(),
                "cores": sorted(os.sched_getaffinity(0)), "rss_bytes": memory.resident_bytes(),
                "peak_rss_bytes": memory.peak_resident_bytes()}


@ray.remote
class DraftActor(_Base):
    """The draft worker on the device node."""

    def __init__(self, spec: WorkerSpec, by_reference: bool = False,
                 outbound: InboundLink | None = None) -> None:
        model, _ = _load(spec)
        super().__init__(model.vocab_size, None, outbound)
        self.worker = make_draft_worker(model, None, spec.batch_sessions)
        self.by_reference = by_reference  # hand proposals on by reference (see _hand_on)
        # A batched draft drafts each session in a thread of its own, so that sessions' depths meet
        # in one forward; calls for one session still run one after another, in arrival order.
        # Unbatched, one thread computes (the draft owns its cores); either way the event loop stays
        # free, so a proposal that arrives during speculation stops it after the depth in hand.
        self._batching = isinstance(self.worker, BatchedDraftWorker)
        self._pool = ThreadPoolExecutor(2 * spec.batch_sessions if self._batching else 1, "draft")
        self._order: dict[str, asyncio.Lock] = {}

    def batch_stats(self) -> dict[int, int]:
        """How many draft forwards ran of each batch size; empty when the draft is not batched."""
        return self.worker.batch_stats() if self._batching else {}

    async def _in_order(self, session_id: str, fn, *args):
        """``fn(*args)`` in this session's turn, in the draft's thread(s), in arrival order."""
        async with self._order.setdefault(session_id, asyncio.Lock()):  # FIFO: arrival order
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def ready(self) -> dict:
        return {"vocab_size": self.vocab_size, "formats": self.worker.model.formats, **self.node_info()}

    def open(self, data: bytes) -> None:
        self.worker.open(_opened(data, self.vocab_size))

    def close(self, session_id: str) -> dict:
        self._order.pop(session_id, None)
        return self.worker.close(session_id)

    async def speculate(self, session_id: str, gamma: int, width: int, budget_ms: float | None = None) -> None:
        try:
            await self._in_order(session_id, self.worker.speculate, session_id, gamma, width, budget_ms)
        except Exception:  # speculation is an optimisation: a failure only means no reuse
            pass

    def resolve(self, data: bytes) -> int:
        """Split verification: the correction token of a pending verdict (its codec frame)."""
        if not isinstance(data, bytes):
            raise TypeError(f"resolve takes an encoded VerifyResult frame (bytes), got {type(data).__name__}")
        msg = codec.decode(data, vocab_size=self.vocab_size)
        if not isinstance(msg, VerifyResult):
            raise codec.ProtocolError(f"resolve takes a VerifyResult frame, got {type(msg).__name__}")
        return self.worker.resolve(msg)

    async def propose(self, req: ProposeRequest) -> bytes | ray.ObjectRef:
        self.worker.interrupt(req.session_id)  # the verdict is in: speculation on it stops now
        try:
            frame = self._send(await self._in_order(req.session_id, self.worker.propose, req))
        except Exception as exc:  # answered, not raised: the round fails, the actor keeps serving
            frame = _error(req, type(exc).__name__, f"draft: {exc}")
        return _hand_on(frame, self.by_reference)


@ray.remote
class StageActor(_Base):
    """One target stage on an edge node."""

    def __init__(self, spec: WorkerSpec, inbound: InboundLink | None, by_reference: bool = False,
                 outbound: InboundLink | None = None) -> None:
        model, dtype = _load(spec)
        super().__init__(model.vocab_size, inbound, outbound)
        # The vocabulary's strings only when a session asks for a rule with a lexicon.
        self.worker = TargetStage(model, vocab=lambda: hf.vocab_strings(
            hf.load_tokenizer(resolve(spec.model, spec.cache_dir)), model.vocab_size), weights=spec.weights, dtype=dtype)
        self.by_reference = by_reference  # hand frames on by reference (see _hand_on)
        # Batched rounds: messages that arrive while a forward runs are served by the next one
        # (TargetStage.step_many). Each waits in a thread of its own so the event loop stays free;
        # twice the batch, so that a full batch can gather while one runs.
        self._batcher = MicroBatcher(self.worker.step_many, spec.batch_sessions) if spec.batch_sessions > 1 else None
        self._pool = ThreadPoolExecutor(2 * spec.batch_sessions, "stage-batch") if self._batcher else None

    def ready(self) -> dict:
        return {"vocab_size": self.vocab_size, "layers": list(self.worker.model.layers),
                "formats": self.worker.model.formats, **self.node_info()}

    def batch_stats(self) -> dict[int, int]:
        """How many forwards ran of each batch size (``{sessions: count}``); empty when off."""
        return self._batcher.stats() if self._batcher is not None else {}

    def open(self, data: bytes) -> None:
        self.worker.open(_opened(data, self.vocab_size))

    def close(self, session_id: str) -> None:
        self.worker.close(session_id)
        if self._batcher is not None:
            self._batcher.forget(session_id)

    async def step(self, data: bytes | ray.ObjectRef) -> bytes | ray.ObjectRef:
        """One round's message (bytes, or a reference to them on the sender's node) -> the next
        stage's frame, or the verdict (bytes, for the driver) on the last stage."""
        frame = await self._handle(data, self._step)
        return frame if self.worker.model.is_last else _hand_on(frame, self.by_reference)

    async def federated_p(self, data: bytes | ray.ObjectRef, top_k: int) -> bytes:
        """SpecFed, on a federated worker's last stage: the round's message -> this worker's top-``top_k``
        p rows (a :class:`FederatedRows` frame, for the driver's aggregator) instead of a verdict."""
        return await self._handle(data, lambda msg: worker_reply(*self.worker.federated_p(msg), top_k))

    async def _step(self, msg):
        if self._batcher is None:
            return self.worker.step(msg)
        sid = (msg if isinstance(msg, DraftProposal) else msg.proposal).session_id
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._batcher.submit, msg, sid)

    async def _handle(self, data: bytes | ray.ObjectRef, compute) -> bytes:
        """Receives a frame, runs ``compute(message)`` (a value, or an awaitable) and encodes its
        answer; a frame that fails anywhere is answered with an error frame, an upstream error passed on."""
        t_arrive = time.perf_counter()
        try:
            if isinstance(data, ray.ObjectRef):
                data = await data
            msg = await self._receive(data)
        except Exception as exc:  # not a frame at all (wrong type, garbage, lost): the sender's error
            return _error(None, type(exc).__name__, f"stage {self.worker.model.layers}: {exc}")
        if isinstance(msg, ErrorMessage):
            return data
        try:
            out = compute(msg)
            # each session's frame is encoded and counted on its own
            return self._send(await out if asyncio.iscoroutine(out) else out)
        except Exception as exc:
            where = f"stage {self.worker.model.layers} after {1e3 * (time.perf_counter() - t_arrive):.0f} ms"
            return _error(msg, type(exc).__name__, f"{where}: {exc}")


@ray.remote
class EchoActor:
    """An actor that does nothing, shaped like the stage actors (async): measures Ray's own cost."""

    async def ping(self) -> None:
        return None

    async def size(self, data: bytes) -> int:
        return len(data)

    async def payload(self, nbytes: int) -> bytes:
        return b"\x5a" * nbytes
