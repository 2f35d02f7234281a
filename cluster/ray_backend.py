"""The Ray backends: ``local`` (Ray on this machine, every worker its own process) and ``cluster``.

The scheduler is the same as in process; only the two small interfaces change. A round is one chain
of object references, draft -> stage 0 -> ... -> last stage, and the driver fetches only the final,
few-dozen-byte verdict, with a deadline. Every remote wait goes through :class:`RemoteCalls`, which
turns a dead or silent worker into a :class:`RemoteError` naming it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import statistics
import time
from typing import Callable

import ray

from specmesh.actors import hf
from specmesh.actors.models import resolve
from specmesh.actors.remote import DraftActor, EchoActor, InboundLink, StageActor, WorkerSpec
from specmesh.runtime import codec
from specmesh.runtime.config import SpecConfig
from specmesh.runtime.interfaces import Backend, ModelInfo
from specmesh.runtime.messages import ErrorMessage, OpenSession, ProposeRequest, VerifyResult
from specmesh.runtime.session import DRAFT, stage_role
from specmesh.runtime.traffic import DOWNLINK, UPLINK, TrafficMeter, TrafficSnapshot

from . import links
from .inproc import check_vocab, model_info, round_hops, topology_for
from .layout import Topology, check_threads
from .placement import Placement, place, remove_placement_group, stand_in
from .remote_calls import LOAD_TIMEOUT_S, ROUND_TIMEOUT_S, RemoteCalls, RemoteError, Pending, Worker

__all__ = ["RemoteError", "build_local", "build_cluster", "shutdown", "call_latency"]

log = logging.getLogger(__name__)


class RayTraffic(TrafficMeter):
    """The driver's view of the bytes: what it received itself plus every actor's meter."""

    def __init__(self, workers: list[Worker], calls: RemoteCalls) -> None:
        super().__init__()
        self._workers = workers
        self._calls = calls

    def snapshot(self, session: str | None = None) -> TrafficSnapshot:
        # After a failed round some counters are unreadable; the generation is failing anyway.
        merged = super().snapshot(session)
        for snap in self._calls.call(self._workers, "traffic_snapshot", session,
                                     best_effort=bool(self._calls.unresponsive)):
            if snap is not None:
                merged = merged.merged(snap)
        return merged

    def forget(self, session: str) -> None:
        super().forget(session)
        self._calls.call(self._workers, "forget_traffic", session, best_effort=True)


class RayDrafter:
    def __init__(self, worker: Worker, calls: RemoteCalls) -> None:
        self.worker = worker
        self.calls = calls

    @property
    def actor(self):
        return self.worker.handle

    def open(self, msg: OpenSession) -> None:
        self.calls.call([self.worker], "open", codec.encode(msg))

    def close(self, session_id: str) -> dict:
        return self.calls.call([self.worker], "close", session_id, best_effort=True)[0] or {}

    def recover(self) -> bool:
        return self.calls.replace(self.worker)

    def speculate(self, session_id: str, gamma: int, width: int, budget_ms: float | None) -> None:
        # Fire and forget: the actor runs it after propose, while the stages verify.
        self.actor.speculate.remote(session_id, gamma, width, budget_ms)

    def resolve(self, verdict: VerifyResult) -> int:
        # Driver and draft share the device node: the verdict crosses as a codec frame, not counted
        # again (it was counted on the downlink).
        return int(self.calls.call([self.worker], "resolve", codec.encode(verdict))[0])

    def propose(self, req: ProposeRequest) -> Pending:
        # An ObjectRef that the driver never fetches: it goes straight to stage 0.
        return Pending(self.actor.propose.remote(req), req.session_id, req.round)


class StageWorkers:
    """Opening, closing and replacing a Ray target's stage actors (its ``workers`` and ``calls``)."""

    workers: list[Worker]
    calls: RemoteCalls

    def open(self, msg: OpenSession) -> None:
        self.calls.call(self.workers, "open", codec.encode(msg))

    def close(self, session_id: str) -> None:
        self.calls.call(self.workers, "close", session_id, best_effort=True)

    def recover(self, role: str) -> bool:
        worker = next((w for w in self.workers if w.role == role), None)
        return worker is not None and self.calls.replace(worker)


class RayTarget(StageWorkers):
    def __init__(self, stages: list[Worker], draft: Worker | None, downlink: links.LinkSpec,
                 down_name: str, traffic: TrafficMeter, vocab_size: int, calls: RemoteCalls,
                 up_name: str = "") -> None:
        self.workers = stages
        self.up_name = up_name
        self.draft = draft
        self.downlink = downlink
        self.down_name = down_name
        self.traffic = traffic
        self.vocab_size = vocab_size
        self.calls = calls

    @property
    def stages(self) -> list:
        """The stage actor handles, in pipeline order."""
        return [w.handle for w in self.workers]

    def verify(self, proposal) -> VerifyResult:
        ref, head = send(proposal, self.draft, self.traffic, self.up_name)
        chain = list(head)
        for stage in self.workers:
            ref = stage.handle.step.remote(ref)
            chain.append((stage, ref))
        data = self.calls.await_chain(chain, proposal.session_id, proposal.round)
        delay_s = links.sleep_for(self.downlink, len(data))
        return received(data, self.down_name, self.traffic, self.vocab_size, proposal.session_id, delay_s)


def send(proposal, draft: Worker | None, traffic: TrafficMeter, up_name: str) -> tuple[ray.ObjectRef, list]:
    """A round's proposal on its way to stage 0: its reference, and the hops it has already taken.

    Args:
        proposal: the draft actor's :class:`Pending` proposal, or (target-only) a
            :class:`DraftProposal` that the driver, the device then, encodes and sends itself.
        draft: the draft's worker (the first receiver of a pending proposal's chain).
        up_name: the uplink the driver's encoding time is counted on.

    Returns:
        (the reference stage 0 takes, ``[(draft, ref)]`` for a pending proposal else ``[]``).
    """
    if isinstance(proposal, Pending):
        return proposal.ref, [(draft, proposal.ref)]
    t0 = time.perf_counter()
    data = codec.encode(proposal)
    traffic.add_codec_time(up_name, UPLINK, (time.perf_counter() - t0) * 1e3, proposal.session_id)
    return ray.put(data), []


def received(data: bytes, link_name: str, traffic: TrafficMeter, vocab_size: int, session_id: str,
             delay_s: float, where: str = ""):
    """The driver's end of a round's downlink: decodes the last stage's frame and counts its bytes
    (with the link's modelled ``delay_s``, already waited) on ``link_name``.

    Raises:
        RemoteError: the frame is an :class:`ErrorMessage` (``where`` names the worker it came from).
    """
    t0 = time.perf_counter()
    msg = codec.decode(data, vocab_size=vocab_size)
    traffic.record(link_name, DOWNLINK, len(data), session_id, delay_s * 1e3, (time.perf_counter() - t0) * 1e3)
    if isinstance(msg, ErrorMessage):
        raise RemoteError(f"round {msg.round} of session {msg.session_id} failed{where}: {msg.code}: {msg.text}")
    return msg


def _build(config: SpecConfig, cluster: bool) -> Backend:
    topology = topology_for(config)
    # The driver reads configs only (small); every actor loads its own slice on its own node.
    target_dir = resolve(config.target, config.cache_dir)
    total = hf.num_layers(hf.load_config(target_dir))
    split = topology.split_layers(total)
    tokenizer = hf.load_tokenizer(target_dir)
    info: ModelInfo = model_info(target_dir, total, tokenizer)
    check_layout(topology, config, cluster)
    placement = place(topology, cluster)
    hops = round_hops(topology)
    calls = RemoteCalls(config.timeout_s, config.hop_timeout_s)
    workers: list[Worker] = []
    with killed_on_failure(workers, placement):
        stages = spawn_stages(config, topology, config.target, split, hops, placement.options[1:], cluster,
                              stage_role)
        workers += stages
        draft = spawn_draft(config, topology, placement.options[0], cluster, hops[0])
        workers += [draft] if draft is not None else []
        start(workers, calls, config, info)
    down = hops[-1]
    downlink = links.emulated(down.spec, topology.emulate, real_network=cluster)
    target = RayTarget(stages, draft, downlink, down.name, RayTraffic(workers, calls), info.vocab_size, calls,
                       hops[0].name)
    return ray_backend(target, draft, workers, placement, calls, info, tokenizer, topology, cluster,
                       (hops[0].name, hops[-1].name), len(stages))


def check_layout(topology: Topology, config: SpecConfig, cluster: bool) -> None:
    """Refuses a layout whose actors would run more threads than their nodes own cores, or (on one
    machine, ``local``) name cores this machine lacks."""
    check_threads(topology, config.threads)
    if not cluster:  # every node is this machine: the cores they name must exist here
        topology.check_machine_cores()


def _compute(topology: Topology, config: SpecConfig, host: str) -> tuple[int, tuple[int, ...] | None]:
    """Threads and cores of an actor on ``host``: the node's cores, one thread each."""
    cores = topology.cores_for(host)
    return config.threads or (len(cores) if cores else 1), cores


def spawn_stages(config: SpecConfig, topology: Topology, model: str, split: list[range], hops: list,
                 options: list[dict], cluster: bool, role: Callable[[int], str]) -> list[Worker]:
    """Starts one :class:`StageActor` per stage of ``topology`` (loading happens in the actors).

    Args:
        model: the target model the stages slice.
        split: the layers of each stage.
        hops: the round's hops (``inproc.round_hops``: device -> stage 0 -> ... -> device), named
            as the bytes are to be counted.
        options: the Ray actor options of each stage (:func:`placement.place`).
        role: the worker's name of stage ``i`` (recovery and errors name it).
    """
    workers = []
    for i, layers in enumerate(split):
        hop = hops[i]
        link = links.emulated(hop.spec, topology.emulate, real_network=cluster)
        inbound = InboundLink(hop.name, hop.direction, None if link.is_ideal else link)
        threads, cores = _compute(topology, config, topology.stages[i])
        spec = WorkerSpec(model, (layers.start, layers.stop), config.dtype, threads,
                          config.cache_dir, cores, weights=config.weights, batch_sessions=config.batch_sessions)
        out = hops[i + 1]  # the next stage's inbound hop, or the downlink after the last stage
        args = (spec, inbound, cluster, InboundLink(out.name, out.direction))
        spawn = functools.partial(StageActor.options(**options[i]).remote, *args)
        spare = stand_in(topology, topology.stages[i]) if cluster else None
        worker = Worker(role(i), spawn(), spawn=spawn)
        if spare is not None:  # other nodes can host this stage once its own is gone
            worker.stand_in = functools.partial(StageActor.options(**spare).remote, *args)
            worker.needs = spare["resources"]
        workers.append(worker)
    return workers


def spawn_draft(config: SpecConfig, topology: Topology, options: dict, cluster: bool, uplink) -> Worker | None:
    """Starts the :class:`DraftActor` on the device node (None for target-only); its proposals'
    encoding time is counted on ``uplink`` (the round's first hop)."""
    if config.draft is None:
        return None
    threads, cores = _compute(topology, config, topology.device.name)
    spec = WorkerSpec(config.draft, None, config.dtype, threads, config.cache_dir, cores,
                      config.draft_weights, config.draft_head_rows, config.batch_sessions)
    spawn = functools.partial(DraftActor.options(**options).remote, spec, cluster,
                              InboundLink(uplink.name, uplink.direction))
    return Worker(DRAFT, spawn(), spawn=spawn)


def start(workers: list[Worker], calls: RemoteCalls, config: SpecConfig, info: ModelInfo) -> None:
    """Readiness: every actor has loaded its model (errors surface here, before any round)."""
    try:
        ready = calls.call(workers, "ready", timeout_s=LOAD_TIMEOUT_S)
    except (RemoteError, ray.exceptions.RayError) as exc:
        raise RuntimeError(f"a worker failed to start: {exc}") from None
    for w, answer in zip(workers, ready):
        w.info = answer
    for w in workers:
        if w.role == DRAFT:
            check_vocab(w.info["vocab_size"], info.vocab_size, config)


@contextlib.contextmanager
def killed_on_failure(workers: list[Worker], placement: Placement):
    """Stops every worker started so far (and the placement group) when the build fails."""
    try:
        yield
    except BaseException:
        _kill(workers, placement)
        raise


def ray_backend(target, draft: Worker | None, workers: list[Worker], placement: Placement, calls: RemoteCalls,
                info: ModelInfo, tokenizer, topology: Topology, cluster: bool, device_links: tuple[str, ...],
                num_stages: int) -> Backend:
    """The :class:`Backend` of started Ray workers: their bytes, their shutdown, where they run."""
    drafter = RayDrafter(draft, calls) if draft is not None else None
    backend = Backend(drafter, target, info, tokenizer, target.traffic, device_links=device_links,
                      num_stages=num_stages)
    backend.close = lambda: _kill(workers, placement)
    backend.workers = [{"role": w.role, **w.info} for w in workers]
    # Separate machines, or one machine whose device cores are the draft's alone: overlap pays.
    pinned = topology.cores_for(topology.device.name) is not None
    backend.draft_cores_disjoint = topology.device_cores_disjoint() if pinned else cluster
    return backend


def _kill(workers: list[Worker], placement: Placement) -> None:
    """Stops every worker and releases the placement group; safe to call twice."""
    for w in workers:
        try:
            ray.kill(w.handle, no_restart=True)
        except Exception:  # already gone, or Ray already shut down
            pass
    if placement.group is not None:
        try:
            remove_placement_group(placement.group)
        except Exception:
            pass
        placement.group = None


def connect(cluster: bool, topology: str | None) -> None:
    """Connects this process to Ray: ``local`` (``cluster`` False) starts Ray on this machine if
    needed, every worker its own process; a cluster is joined at ``RAY_ADDRESS`` or ``"auto"`` and
    needs a ``topology`` file naming the nodes the workers are placed on."""
    if cluster and not topology:
        raise ValueError("the cluster backend needs a topology file naming the nodes (topology=...)")
    if ray.is_initialized():
        return
    if cluster:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"SPECMESH_CACHE": os.environ.get("SPECMESH_CACHE", "")}}
                 if os.environ.get("SPECMESH_CACHE") else None)


def build_local(config: SpecConfig) -> Backend:
    """Starts Ray on this machine if needed (every worker its own process) and builds the pipeline."""
    connect(False, config.topology)
    return _build(config, cluster=False)


def build_cluster(config: SpecConfig) -> Backend:
    """Connects to a running Ray cluster (``RAY_ADDRESS`` or ``address="auto"``) and places workers
    on the nodes that the topology names."""
    connect(True, config.topology)
    return _build(config, cluster=True)


def shutdown() -> None:
    """Disconnects this process from Ray; stops the local Ray that :func:`build_local` started."""
    if ray.is_initialized():
        ray.shutdown()


def call_latency(payload_bytes: int, calls: int) -> dict[str, float]:
    """Median milliseconds of Ray actor calls on the Ray this process is connected to (benchmarks).

    Measures, with two fresh async actors like the stage actors: an empty call driver -> actor; a call
    carrying ``payload_bytes`` driver -> actor; and ``payload_bytes`` made by one actor and consumed
    by the next as an ``ObjectRef`` (the way a round's messages travel), fetching only its size.
    """
    a, b = EchoActor.options(num_cpus=0).remote(), EchoActor.options(num_cpus=0).remote()
    try:
        ray.get([a.ping.remote(), b.ping.remote()], timeout=LOAD_TIMEOUT_S)
        data = b"\x5a" * payload_bytes  # a bytes argument, put into the object store on every call
        probes = {
            "empty call": lambda: a.ping.remote(),
            "payload call": lambda: a.size.remote(data),
            "actor -> actor payload": lambda: b.size.remote(a.payload.remote(payload_bytes)),
        }
        out = {}
        for name, submit in probes.items():
            ray.get(submit(), timeout=ROUND_TIMEOUT_S)  # warm-up
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                ray.get(submit(), timeout=ROUND_TIMEOUT_S)
                times.append((time.perf_counter() - t0) * 1e3)
            out[name] = statistics.median(times)
        return out
    finally:
        for actor in (a, b):
            ray.kill(actor, no_restart=True)
