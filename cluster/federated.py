"""SpecFed in process: M target workers verify every round; the device averages their top-K replies.

Each worker is a pipeline of :class:`TargetStage` objects (a full model, or its stages) on its own
nodes. A round sends the draft's proposal to every worker over its own links; a worker's last stage
answers its warped p rows (:meth:`TargetStage.federated_p`), truncated to the top-K on the worker's
side into a :class:`FederatedRows` that crosses the codec back (bytes counted per worker link,
``worker<m>:<src>-><dst>``). The :class:`~specmesh.runtime.federated.Aggregator`, on the device with
the draft, rebuilds, averages and verifies. Selected by ``SpecConfig.federated_workers`` (or a
topology file's ``[federated]`` table, :mod:`specmesh.cluster.federated_plan`); the Ray backends do
not run federated deployments yet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from specmesh.actors import hf
from specmesh.actors.models import resolve
from specmesh.actors.stage import TargetStage
from specmesh.policies.federated import FederatedSettings, federated_settings
from specmesh.runtime.config import SpecConfig
from specmesh.runtime.federated import AggregateRound, Aggregator, worker_reply
from specmesh.runtime.interfaces import Backend, ModelInfo
from specmesh.runtime.messages import DraftProposal, OpenSession, VerifyResult
from specmesh.runtime.traffic import TrafficMeter

from . import links
from .federated_plan import worker_layouts
from .inproc import _Hop, _Wire, load_drafter, model_info, round_hops

# probe(proposal, each worker's true p [g + 1, V], the aggregation): measurements only.
Probe = Callable[[DraftProposal, list[torch.Tensor], AggregateRound], None]


@dataclass
class FederatedWorker:
    """One worker: its model name, its stages in pipeline order and its round's hops."""

    name: str  # "worker1", ...: prefixes its link names
    model: str
    stages: list[TargetStage]
    hops: list[_Hop]  # device -> stage 0 -> ... -> last stage -> device


class FederatedTarget:
    """The :class:`~specmesh.runtime.interfaces.Target` of a federated deployment in this process.

    Args:
        workers: the M workers, in the order of the settings' weights.
        settings: weights, top-K and reconstruction strategy.
        wire: encodes, counts, delays and decodes every message.
        vocab_size: the shared vocabulary.
    """

    def __init__(self, workers: list[FederatedWorker], settings: FederatedSettings, wire: _Wire,
                 vocab_size: int) -> None:
        if len(workers) != settings.num_workers:
            raise ValueError(f"{len(workers)} workers for {settings.num_workers} weights")
        self.workers = workers
        self.settings = settings
        self.wire = wire
        self.vocab_size = vocab_size
        self.aggregator = Aggregator(settings, vocab_size)
        self.probe: Probe | None = None  # called after each aggregation when set

    def with_settings(self, settings: FederatedSettings) -> "FederatedTarget":
        """The same workers (and wire) under other settings: sessions opened on it use those."""
        return FederatedTarget(self.workers, settings, self.wire, self.vocab_size)

    def open(self, msg: OpenSession) -> None:
        self.aggregator.open(msg)  # refuses what it cannot verify before any worker opens
        for w in self.workers:
            for s in w.stages:
                s.open(msg)

    def close(self, session_id: str) -> None:
        self.aggregator.close(session_id)
        for w in self.workers:
            for s in w.stages:
                s.close(session_id)

    def recover(self, role: str) -> bool:
        return False  # a worker in this process cannot die apart from it

    def verify(self, proposal: DraftProposal) -> VerifyResult:
        """Every worker verifies the round (one after the other here; in parallel on real nodes)."""
        replies, truths = [], []
        for w in self.workers:
            msg = proposal
            for i, stage in enumerate(w.stages):
                msg = self.wire.cross(w.hops[i], msg)
                if i + 1 < len(w.stages):
                    msg = stage.step(msg)
            received, p, stage_ms = w.stages[-1].federated_p(msg)
            replies.append(self.wire.cross(w.hops[-1], worker_reply(received, p, stage_ms, self.settings.top_k)))
            truths.append(p)
        result, agg = self.aggregator.verdict(proposal, replies)
        if self.probe is not None:
            self.probe(proposal, truths, agg)
        return result


def build_federated(config: SpecConfig) -> Backend:
    """Loads the draft and every federated worker in this process and wires them."""
    settings = federated_settings(config.federated_workers, config.federated_weights, config.federated_k,
                                  config.federated_strategy)
    dtype = hf.resolve_dtype(config.dtype)
    workers, infos, tokenizer, first_dir = [], [], None, None
    for m, (model, layout) in enumerate(zip(config.federated_workers, worker_layouts(config))):
        target_dir = resolve(model, config.cache_dir)
        total = hf.num_layers(hf.load_config(target_dir))
        tok = hf.load_tokenizer(target_dir)
        info = model_info(target_dir, total, tok)
        if infos and info.vocab_size != infos[0].vocab_size:
            raise ValueError(f"federated worker {m + 1} ({model!r}) has a vocabulary of {info.vocab_size} "
                             f"tokens, worker 1 ({config.federated_workers[0]!r}) {infos[0].vocab_size}: "
                             "federated workers must share one vocabulary")
        if not infos:
            tokenizer, first_dir = tok, target_dir
        infos.append(info)
        stages = [TargetStage(hf.load_stage(target_dir, r, dtype=dtype), config.threads)
                  for r in layout.split_layers(total)]
        name = f"worker{m + 1}"
        hops = [_Hop(f"{name}:{h.name}", links.emulated(h.spec, layout.emulate, real_network=False), h.direction)
                for h in round_hops(layout)]
        workers.append(FederatedWorker(name, model, stages, hops))
    info = ModelInfo(vocab_size=infos[0].vocab_size, max_positions=min(i.max_positions for i in infos),
                     num_layers=infos[0].num_layers, eos_token_ids=infos[0].eos_token_ids)
    drafter = load_drafter(config, dtype, first_dir, info.vocab_size)
    traffic = TrafficMeter()
    target = FederatedTarget(workers, settings, _Wire(traffic, info.vocab_size), info.vocab_size)
    device_links = tuple(h.name for w in workers for h in (w.hops[0], w.hops[-1]))
    # Every worker processes every round alike: one set of target positions serves them all.
    return Backend(drafter, target, info, tokenizer, traffic, device_links=device_links, num_stages=1)


def dense_settings(settings: FederatedSettings) -> FederatedSettings:
    """The same weights with every token sent: the exact weighted average (the reference)."""
    return FederatedSettings(settings.weights, 0, settings.strategy)


__all__ = ["FederatedTarget", "FederatedWorker", "Probe", "build_federated", "dense_settings"]
