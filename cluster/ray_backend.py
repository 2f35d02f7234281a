"""The Ray backends: ``local`` (Ray on this machine, every worker its own process) and ``cluster``.

The scheduler is the same as in process; only the two small interfaces change. A round is one chain
of object references, draft -> stage 0 -> ... -> last stage, and the driver fetches only the final,
few-dozen-byte verdict, with a deadline.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from specmesh.actors import hf
from specmesh.actors.models import resolve
from specmesh.actors.remote import DraftActor, InboundLink, StageActor, WorkerSpec
from specmesh.runtime import codec
from specmesh.runtime.config import SpecConfig
from specmesh.runtime.interfaces import Backend, ModelInfo
from specmesh.runtime.messages import ErrorMessage, OpenSession, ProposeRequest, VerifyResult
from specmesh.runtime.traffic import DOWNLINK, TrafficMeter, TrafficSnapshot

from . import links
from .inproc import check_vocab, model_info, round_hops, topology_for
from .topology import Topology

log = logging.getLogger(__name__)

# Default deadline of every remote wait (model loading waits longer: see LOAD_TIMEOUT_S).
ROUND_TIMEOUT_S = 300.0
LOAD_TIMEOUT_S = 900.0
# A sliver of a node's custom resource pins an actor to that node without limiting how many land.
PIN = 0.001


class RemoteError(RuntimeError):
    """A worker answered a round with an error message."""


@dataclass
class _Placement:
    options: list[dict]  # Ray actor options per worker: draft first, then each stage
    group: object | None = None  # the placement group, removed on shutdown


class RayTraffic(TrafficMeter):
    """The driver's view of the bytes: what it received itself plus every actor's meter."""

    def __init__(self, actors: list) -> None:
        super().__init__()
        self._actors = actors

    def snapshot(self) -> TrafficSnapshot:
        merged = super().snapshot()
        for snap in ray.get([a.traffic_snapshot.remote() for a in self._actors], timeout=ROUND_TIMEOUT_S):
            merged = merged.merged(snap)
        return merged


class RayDrafter:
    def __init__(self, actor) -> None:
        self.actor = actor

    def open(self, msg: OpenSession) -> None:
        ray.get(self.actor.open.remote(msg), timeout=ROUND_TIMEOUT_S)

    def close(self, session_id: str) -> None:
        ray.get(self.actor.close.remote(session_id), timeout=ROUND_TIMEOUT_S)

    def propose(self, req: ProposeRequest):
        return self.actor.propose.remote(req)  # an ObjectRef: never fetched by the driver


class RayTarget:
    def __init__(self, stages: list, downlink: links.LinkSpec, down_name: str, traffic: TrafficMeter,
                 vocab_size: int, timeout_s: float) -> None:
        self.stages = stages
        self.downlink = downlink
        self.down_name = down_name
        self.traffic = traffic
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s

    def open(self, msg: OpenSession) -> None:
        ray.get([s.open.remote(msg) for s in self.stages], timeout=ROUND_TIMEOUT_S)

    def close(self, session_id: str) -> None:
        ray.get([s.close.remote(session_id) for s in self.stages], timeout=ROUND_TIMEOUT_S)

    def verify(self, proposal) -> VerifyResult:
        ref = proposal if isinstance(proposal, ray.ObjectRef) else ray.put(codec.encode(proposal))
        for stage in self.stages:
            ref = stage.step.remote(ref)
        data = ray.get(ref, timeout=self.timeout_s)
        self.traffic.record(self.down_name, DOWNLINK, len(data))
        links.sleep_for(self.downlink, len(data))
        msg = codec.decode(data, vocab_size=self.vocab_size)
        if isinstance(msg, ErrorMessage):
            raise RemoteError(f"round {msg.round} of session {msg.session_id} failed: {msg.code}: {msg.text}")
        return msg


def _placement(topology: Topology, cluster: bool) -> _Placement:
    """Actor options: in ``local`` mode every worker just gets a process; in ``cluster`` mode each is
    pinned to its topology node by that node's custom resource, inside one placement group."""
    hosts = [topology.device.name, *topology.stages]
    if not cluster:
        return _Placement([{"num_cpus": 0} for _ in hosts])
    bundles = []
    for host in hosts:
        node = topology.node(host)
        if not node.resources:
            raise ValueError(
                f"node {host!r} has no custom resources in the topology; the cluster backend pins "
                f"workers with them (e.g. resources = {{ specmesh_{host} = 1 }} on `ray start`)"
            )
        bundles.append({k: PIN for k in node.resources})
    needed: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            needed[k] = needed.get(k, 0) + v
    available = ray.cluster_resources()
    missing = {k: v for k, v in needed.items() if available.get(k, 0) < v}
    if missing:
        raise RuntimeError(
            f"the Ray cluster lacks resources {sorted(missing)} that the topology asks for; "
            f"it has {sorted(k for k in available if not k.startswith('node:'))}"
        )
    group = placement_group(bundles, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=LOAD_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(f"placement group {bundles} could not be placed within {LOAD_TIMEOUT_S}s") from None
    options = [
        {"num_cpus": 0, "scheduling_strategy": PlacementGroupSchedulingStrategy(group, i)}
        for i in range(len(hosts))
    ]
    return _Placement(options, group)


def _build(config: SpecConfig, cluster: bool) -> Backend:
    topology = topology_for(config)
    # The driver reads configs only (small); every actor loads its own slice on its own node.
    target_dir = resolve(config.target, config.cache_dir)
    total = hf.num_layers(hf.load_config(target_dir))
    split = topology.split_layers(total)
    info: ModelInfo = model_info(target_dir, total)
    threads = config.threads or 1
    placement = _placement(topology, cluster)
    hops = round_hops(topology)
    mode = topology.emulate
    stages = []
    actors = []
    try:
        for i, layers in enumerate(split):
            hop = hops[i]
            link = links.emulated(hop.spec, mode, real_network=cluster)
            inbound = InboundLink(hop.name, hop.direction, None if link.is_ideal else link)
            spec = WorkerSpec(config.target, (layers.start, layers.stop), config.dtype, threads, config.cache_dir)
            stages.append(StageActor.options(**placement.options[i + 1]).remote(spec, inbound))
        actors.extend(stages)
        drafter = None
        if config.draft is not None:
            spec = WorkerSpec(config.draft, None, config.dtype, threads, config.cache_dir)
            draft = DraftActor.options(**placement.options[0]).remote(spec)
            actors.append(draft)
            drafter = RayDrafter(draft)
        # Readiness: every actor has loaded its model (errors surface here, before any round).
        ready = ray.get([a.ready.remote() for a in actors], timeout=LOAD_TIMEOUT_S)
        if drafter is not None:
            check_vocab(ready[-1]["vocab_size"], info.vocab_size, config)
    except BaseException:
        _kill(actors, placement)
        raise
    traffic = RayTraffic(actors)
    down = hops[-1]
    downlink = links.emulated(down.spec, mode, real_network=cluster)
    target = RayTarget(stages, downlink, down.name, traffic, info.vocab_size, ROUND_TIMEOUT_S)
    backend = Backend(drafter, target, info, hf.load_tokenizer(target_dir), traffic,
                      device_links=(hops[0].name, hops[-1].name))
    backend.close = lambda: _kill(actors, placement)
    backend.workers = [{"role": n, **r} for n, r in zip(
        [f"stage{i}" for i in range(len(stages))] + ["draft"], ready)]
    return backend


def _kill(actors: list, placement: _Placement) -> None:
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # already gone
            pass
    if placement.group is not None:
        remove_placement_group(placement.group)


def build_local(config: SpecConfig) -> Backend:
    """Starts Ray on this machine if needed (every worker its own process) and builds the pipeline."""
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"SPECMESH_CACHE": os.environ.get("SPECMESH_CACHE", "")}}
                 if os.environ.get("SPECMESH_CACHE") else None)
    return _build(config, cluster=False)


def build_cluster(config: SpecConfig) -> Backend:
    """Connects to a running Ray cluster (``RAY_ADDRESS`` or ``address="auto"``) and places workers
    on the nodes that the topology names."""
    if not config.topology:
        raise ValueError("the cluster backend needs a topology file naming the nodes (topology=...)")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
    return _build(config, cluster=True)
