"""SpecFed in process: M target workers verify every round; the device averages their top-K replies.

Each worker is a pipeline of :class:`TargetStage` objects (a full model, or its stages) on its own
nodes. A round sends the draft's proposal to every worker over its own links; a worker's last stage
answers its warped p rows (:meth:`TargetStage.federated_p`), truncated to the top-K on the worker's
side into a :class:`FederatedRows` that crosses the codec back (bytes counted per worker link,
``worker<m>:<src>-><dst>``). The :class:`~specmesh.runtime.federated.Aggregator`, on the device with
the draft, rebuilds, averages and verifies. Selected by ``SpecConfig.federated_workers`` (or a
topology file's ``[federated]`` table, :mod:`specmesh.cluster.federated_plan`). On the Ray backends
(``local``, ``cluster``) the workers' stages are actors and the rounds run in parallel
(:mod:`specmesh.cluster.federated_ray`); both share :class:`FederatedRounds` and :func:`plan_federated`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from specmesh.actors import hf, lowbit
from specmesh.actors.models import resolve
from specmesh.actors.stage import TargetStage
from specmesh.policies.federated import FederatedSettings, federated_settings
from specmesh.runtime.config import SpecConfig
from specmesh.runtime.federated import AggregateRound, Aggregator, worker_reply
from specmesh.runtime.interfaces import Backend, ModelInfo
from specmesh.runtime.messages import DraftProposal, FederatedRows, OpenSession, VerifyResult
from specmesh.runtime.traffic import TrafficMeter

from . import links
from .federated_plan import worker_layouts
from .inproc import _Hop, _Wire, load_drafter, model_info, round_hops
from .layout import Topology

# probe(proposal, each worker's true p [g + 1, V], the aggregation): measurements only.
Probe = Callable[[DraftProposal, list[torch.Tensor], AggregateRound], None]


@dataclass
class FederatedWorker:
    """One worker: its model name, its stages in pipeline order and its round's hops."""

    name: str  # "worker1", ...: prefixes its link names
    model: str
    stages: list[TargetStage]
    hops: list[_Hop]  # device -> stage 0 -> ... -> last stage -> device


class FederatedRounds:
    """What every federated target shares, in process or on Ray: the settings, the aggregator, the
    order in which a session opens and closes, and the round's verdict from the workers' replies.

    Subclasses reach their workers through :meth:`_open_workers` and :meth:`_close_workers`, gather
    every worker's :class:`FederatedRows` and end :meth:`verify` with :meth:`verdict`.

    Args:
        settings: weights, top-K and reconstruction strategy.
        num_workers: how many workers the deployment has (one weight each).
        vocab_size: the shared vocabulary.
    """

    def __init__(self, settings: FederatedSettings, num_workers: int, vocab_size: int) -> None:
        if num_workers != settings.num_workers:
            raise ValueError(f"{num_workers} workers for {settings.num_workers} weights")
        self.settings = settings
        self.vocab_size = vocab_size
        self.aggregator = Aggregator(settings, vocab_size)
        self.probe: Probe | None = None  # called after each aggregation when set (in process)

    def with_settings(self, settings: FederatedSettings) -> "FederatedRounds":
        """The same workers (and wire) under other settings: sessions opened on it use those."""
        if settings.num_workers != self.settings.num_workers:
            raise ValueError(f"{settings.num_workers} weights for {self.settings.num_workers} workers")
        other = copy.copy(self)
        other.settings, other.aggregator, other.probe = settings, Aggregator(settings, self.vocab_size), None
        return other

    def open(self, msg: OpenSession) -> None:
        self.aggregator.open(msg)  # refuses what it cannot verify before any worker opens
        self._open_workers(msg)

    def close(self, session_id: str) -> None:
        self.aggregator.close(session_id)
        self._close_workers(session_id)

    def verdict(self, proposal: DraftProposal, replies: list[FederatedRows],
                truths: list[torch.Tensor] | None = None) -> VerifyResult:
        """The round's verdict: the aggregator's, against the weighted average of the ``replies``
        (one per worker, in order); ``truths`` (each worker's full p) feed the probe when known."""
        result, agg = self.aggregator.verdict(proposal, replies)
        if self.probe is not None and truths is not None:
            self.probe(proposal, truths, agg)
        return result

    def _open_workers(self, msg: OpenSession) -> None:
        raise NotImplementedError

    def _close_workers(self, session_id: str) -> None:
        raise NotImplementedError


class FederatedTarget(FederatedRounds):
    """The :class:`~specmesh.runtime.interfaces.Target` of a federated deployment in this process.

    Args:
        workers: the M workers, in the order of the settings' weights.
        settings: weights, top-K and reconstruction strategy.
        wire: encodes, counts, delays and decodes every message.
        vocab_size: the shared vocabulary.
    """

    def __init__(self, workers: list[FederatedWorker], settings: FederatedSettings, wire: _Wire,
                 vocab_size: int) -> None:
        super().__init__(settings, len(workers), vocab_size)
        self.workers = workers
        self.wire = wire

    def _open_workers(self, msg: OpenSession) -> None:
        for w in self.workers:
            for s in w.stages:
                s.open(msg)

    def _close_workers(self, session_id: str) -> None:
        for w in self.workers:
            for s in w.stages:
                s.close(session_id)

    def recover(self, role: str) -> bool:
        return False  # a worker in this process cannot die apart from it

    def verify(self, proposal: DraftProposal) -> VerifyResult:
        """Every worker verifies the round (one after the other here; in parallel on Ray)."""
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
        return self.verdict(proposal, replies, truths)


@dataclass(frozen=True)
class WorkerPlan:
    """One worker of a federated deployment before anything is loaded.

    Attributes:
        name: ``worker<m>``, which prefixes its link names.
        model: its target model, as named.
        target_dir: where that model lies on this machine.
        layout: the deployment's nodes and links with this worker's stages.
        split: the decoder layers of each of its stages.
        hops: device -> stage 0 -> ... -> last stage -> device, named ``worker<m>:<src>-><dst>``, each
            with its link as the topology describes it.
    """

    name: str
    model: str
    target_dir: object
    layout: Topology
    split: list[range]
    hops: list[_Hop]


@dataclass(frozen=True)
class FederatedPlan:
    """Every worker's plan, the settings, and the facts the driver needs (one vocabulary for all)."""

    settings: FederatedSettings
    workers: list[WorkerPlan]
    info: ModelInfo
    tokenizer: object
    first_dir: object  # worker 1's model directory (the draft's tokenizer is checked against it)

    @property
    def device_links(self) -> tuple[str, ...]:
        """Every worker's uplink from the device and downlink back, in worker order."""
        return tuple(h.name for w in self.workers for h in (w.hops[0], w.hops[-1]))


def plan_federated(config: SpecConfig) -> FederatedPlan:
    """Reads every worker's model config and tokenizer (nothing is loaded), checks that they share
    one vocabulary, and lays out each worker's stages and hops."""
    settings = federated_settings(config.federated_workers, config.federated_weights, config.federated_k,
                                  config.federated_strategy)
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
        name = f"worker{m + 1}"
        hops = [_Hop(f"{name}:{h.name}", h.spec, h.direction) for h in round_hops(layout)]
        workers.append(WorkerPlan(name, model, target_dir, layout, layout.split_layers(total), hops))
    info = ModelInfo(vocab_size=infos[0].vocab_size, max_positions=min(i.max_positions for i in infos),
                     num_layers=infos[0].num_layers, eos_token_ids=infos[0].eos_token_ids)
    return FederatedPlan(settings, workers, info, tokenizer, first_dir)


def build_federated(config: SpecConfig) -> Backend:
    """Loads the draft and every federated worker in this process and wires them."""
    plan = plan_federated(config)
    dtype = hf.resolve_dtype(config.dtype, config.weights)
    workers = []
    for w in plan.workers:
        stages = [TargetStage(hf.load_stage(w.target_dir, r, dtype=lowbit.load_dtype(dtype, config.weights)),
                              config.threads, weights=config.weights, dtype=dtype) for r in w.split]
        hops = [_Hop(h.name, links.emulated(h.spec, w.layout.emulate, real_network=False), h.direction)
                for h in w.hops]
        workers.append(FederatedWorker(w.name, w.model, stages, hops))
    info = plan.info
    drafter = load_drafter(config, plan.first_dir, info.vocab_size)
    traffic = TrafficMeter()
    target = FederatedTarget(workers, plan.settings, _Wire(traffic, info.vocab_size), info.vocab_size)
    # Every worker processes every round alike: one set of target positions serves them all.
    return Backend(drafter, target, info, plan.tokenizer, traffic, device_links=plan.device_links, num_stages=1)


def dense_settings(settings: FederatedSettings) -> FederatedSettings:
    """The same weights with every token sent: the exact weighted average (the reference)."""
    return FederatedSettings(settings.weights, 0, settings.strategy)


__all__ = ["FederatedPlan", "FederatedRounds", "FederatedTarget", "FederatedWorker", "Probe", "WorkerPlan",
           "build_federated", "dense_settings", "plan_federated"]
