"""Ray is applied here, and only here, to the plain workers: thin async actor handles.

Each actor loads its own model slice inside its own process, sets its own torch thread count, and
speaks only encoded wire bytes: a message arrives as bytes (Ray resolves the upstream ``ObjectRef``
in the actor, never in the driver), is delayed by the modelled link, decoded, processed, encoded and
returned as bytes for the next actor. A message that cannot be processed is answered with an
encoded :class:`ErrorMessage` and the actor keeps serving; an error arriving from upstream is passed
on unchanged, so the driver sees the first failure of the round.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import ray
import torch

from specmesh.runtime import codec
from specmesh.runtime.messages import ErrorMessage, OpenSession, ProposeRequest
from specmesh.runtime.traffic import TrafficMeter

from . import hf
from .draft import DraftWorker
from .models import resolve
from .stage import TargetStage


@dataclass(frozen=True)
class WorkerSpec:
    """What an actor loads.

    Attributes:
        model: model name or path (resolved on the actor's own node).
        layers: (start, stop) of the decoder layers held; None = the whole model (the draft).
        dtype: parameter dtype name.
        threads: torch intra-op threads in this actor.
        cache_dir: model cache on the actor's node (None: the node's default).
    """

    model: str
    layers: tuple[int, int] | None
    dtype: str
    threads: int
    cache_dir: str | None = None


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


def _load(spec: WorkerSpec) -> hf.StageModel:
    torch.set_num_threads(spec.threads)
    path = resolve(spec.model, spec.cache_dir)
    layers = range(*spec.layers) if spec.layers else None
    return hf.load_stage(path, layers, dtype=hf.resolve_dtype(spec.dtype))


class _Base:
    def __init__(self, vocab_size: int, inbound: InboundLink | None) -> None:
        self.vocab_size = vocab_size
        self.inbound = inbound
        self.traffic = TrafficMeter()

    async def _receive(self, data: bytes):
        if self.inbound is not None:
            self.traffic.record(self.inbound.name, self.inbound.direction, len(data))
            if self.inbound.link is not None:
                await asyncio.sleep(self.inbound.link.delay_s(len(data)))
        return codec.decode(data, vocab_size=self.vocab_size)

    def traffic_snapshot(self):
        return self.traffic.snapshot()

    def node_info(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "threads": torch.get_num_threads()}


@ray.remote
class DraftActor(_Base):
    """The draft worker on the device node."""

    def __init__(self, spec: WorkerSpec) -> None:
        model = _load(spec)
        super().__init__(model.vocab_size, None)
        self.worker = DraftWorker(model)

    def ready(self) -> dict:
        return {"vocab_size": self.vocab_size, **self.node_info()}

    def open(self, msg: OpenSession) -> None:
        self.worker.open(msg)

    def close(self, session_id: str) -> None:
        self.worker.close(session_id)

    def propose(self, req: ProposeRequest) -> bytes:
        try:
            return codec.encode(self.worker.propose(req))
        except Exception as exc:  # answered, not raised: the round fails, the actor keeps serving
            return codec.encode(ErrorMessage(req.session_id, req.round, type(exc).__name__, str(exc)))


@ray.remote
class StageActor(_Base):
    """One target stage on an edge node."""

    def __init__(self, spec: WorkerSpec, inbound: InboundLink | None) -> None:
        model = _load(spec)
        super().__init__(model.vocab_size, inbound)
        self.worker = TargetStage(model)

    def ready(self) -> dict:
        return {"vocab_size": self.vocab_size, "layers": list(self.worker.model.layers), **self.node_info()}

    def open(self, msg: OpenSession) -> None:
        self.worker.open(msg)

    def close(self, session_id: str) -> None:
        self.worker.close(session_id)

    async def step(self, data: bytes) -> bytes:
        t_arrive = time.perf_counter()
        try:
            msg = await self._receive(data)
        except codec.ProtocolError as exc:
            return codec.encode(ErrorMessage("", 0, "ProtocolError", str(exc)))
        if isinstance(msg, ErrorMessage):
            return data
        try:
            return codec.encode(self.worker.step(msg))
        except Exception as exc:
            p = getattr(msg, "proposal", msg)
            where = f"stage {self.worker.model.layers} after {1e3 * (time.perf_counter() - t_arrive):.0f} ms"
            return codec.encode(ErrorMessage(p.session_id, p.round, type(exc).__name__, f"{where}: {exc}"))
