"""SpecFed on the Ray backends (``local`` and ``cluster``): every federated worker's stages are actors.

A round sends the draft actor's proposal (an ``ObjectRef``) to stage 0 of every worker at once; each
worker's stages hand its frames on as the single pipeline's do, and its last stage answers its top-K
p rows (:meth:`StageActor.federated_p`, a ``FederatedRows`` frame). The driver, on the device with the
draft, waits for all M replies together (:meth:`RemoteCalls.await_chains`: one round deadline, a
clock per hop), then runs the aggregator of the in-process deployment (:class:`FederatedRounds`).
Bytes are counted per worker link as in process (``worker<m>:<src>-><dst>``: each stage actor counts
its inbound link, the driver each worker's downlink); the worker links' modelled delays run side by
side. The proposal itself reaches the driver from the draft actor on its own node, uncounted (as a
split verdict crosses to the draft).

A worker stage that dies or misses its deadline fails the round with a :class:`RemoteError` naming
it (``stage<i>@worker<m>``, pid and node); the scheduler then replaces that stage, reopens the
session on every worker and replays the committed tokens, so a seeded output is unchanged.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import ray

from specmesh.runtime import codec
from specmesh.runtime.config import SpecConfig
from specmesh.runtime.interfaces import Backend
from specmesh.runtime.messages import DraftProposal, FederatedRows, VerifyResult
from specmesh.policies.federated import FederatedSettings

from . import links
from .federated import FederatedRounds, plan_federated
from .placement import place
from .ray_backend import (
    RayTraffic, RemoteError, StageWorkers, check_layout, connect, killed_on_failure, ray_backend, received, send, spawn_draft,
    spawn_stages, start,
)
from .remote_calls import Pending, RemoteCalls, Worker


@dataclass
class RayFederatedWorker:
    """One federated worker on Ray: its stage actors and the downlink its replies cross."""

    name: str  # "worker1", ...
    stages: list[Worker]
    downlink: links.LinkSpec  # what the driver waits for a reply (the emulated part)
    down_name: str  # "worker1:edge1->device"


class RayFederatedTarget(FederatedRounds):
    """The :class:`~specmesh.runtime.interfaces.Target` of a federated deployment on Ray.

    Args:
        workers: the M workers, in the order of the settings' weights.
        draft: the draft's worker (None: target-only, the driver sends the proposals).
        settings: weights, top-K and reconstruction strategy.
        traffic: the driver's meter (merged with every actor's).
        vocab_size: the shared vocabulary.
        calls: every remote wait, with its deadline.
        up_name: the link the driver's own encoding time of a target-only proposal is counted on.
    """

    def __init__(self, workers: list[RayFederatedWorker], draft: Worker | None, settings: FederatedSettings,
                 traffic: RayTraffic, vocab_size: int, calls: RemoteCalls, up_name: str) -> None:
        super().__init__(settings, len(workers), vocab_size)
        self.federated, self.draft, self.traffic, self.calls, self.up_name = workers, draft, traffic, calls, up_name

    @property
    def workers(self) -> list[Worker]:
        """Every stage actor of every worker, worker by worker."""
        return [s for w in self.federated for s in w.stages]

    _open_workers = StageWorkers.open  # after the aggregator's (FederatedRounds.open)
    _close_workers = StageWorkers.close
    recover = StageWorkers.recover

    def verify(self, proposal) -> VerifyResult:
        """Every worker verifies the round in parallel; the driver aggregates their replies."""
        sid, rnd = proposal.session_id, proposal.round
        ref, head = send(proposal, self.draft, self.traffic, self.up_name)
        chains = []
        for w in self.federated:
            frame, chain = ref, list(head)
            for i, stage in enumerate(w.stages):
                last = i + 1 == len(w.stages)
                frame = stage.handle.federated_p.remote(frame, self.settings.top_k) if last \
                    else stage.handle.step.remote(frame)
                chain.append((stage, frame))
            chains.append(chain)
        answers = self.calls.await_chains(chains, sid, rnd)
        # Each worker's reply crosses its own downlink: the modelled delays run side by side.
        delays = [w.downlink.delay_s(len(data)) if not w.downlink.is_ideal else 0.0
                  for w, (data, _) in zip(self.federated, answers)]
        wait = max(t + d for (_, t), d in zip(answers, delays)) - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        replies = [self._reply(w, data, sid, d) for w, (data, _), d in zip(self.federated, answers, delays)]
        return self.verdict(self._proposal(proposal), replies)

    def _reply(self, w: RayFederatedWorker, data: bytes, session_id: str, delay_s: float) -> FederatedRows:
        msg = received(data, w.down_name, self.traffic, self.vocab_size, session_id, delay_s, f" on {w.name}")
        if not isinstance(msg, FederatedRows):
            raise RemoteError(f"{w.name} answered a {type(msg).__name__}, not its FederatedRows")
        return msg

    def _proposal(self, proposal) -> DraftProposal:
        """The round's proposal on the driver: the draft actor's frame, already made (every chain
        started from it), fetched from the device node."""
        if not isinstance(proposal, Pending):
            return proposal
        data = ray.get(proposal.ref, timeout=self.calls.timeout_s)
        if isinstance(data, ray.ObjectRef):  # handed on by reference (cluster)
            data = ray.get(data, timeout=self.calls.timeout_s)
        msg = codec.decode(data, vocab_size=self.vocab_size)
        if not isinstance(msg, DraftProposal):
            raise RemoteError(f"round {proposal.round} of session {proposal.session_id}: the draft answered "
                              f"a {type(msg).__name__}")
        return msg


def build_federated_ray(config: SpecConfig) -> Backend:
    """Starts every federated worker's stages and the draft as Ray actors (``config.backend``:
    ``local`` on this machine, ``cluster`` on the topology's nodes) and wires them."""
    cluster = config.backend == "cluster"
    connect(cluster, config.topology)
    plan = plan_federated(config)
    for w in plan.workers:
        check_layout(w.layout, config, cluster)
    # One placement for all: the device first, then every worker's stages in worker order.
    everyone = dataclasses.replace(plan.workers[0].layout, layers=None,
                                   stages=tuple(s for w in plan.workers for s in w.layout.stages))
    placement = place(everyone, cluster)
    calls = RemoteCalls(config.timeout_s, config.hop_timeout_s)
    actors: list[Worker] = []
    federated: list[RayFederatedWorker] = []
    with killed_on_failure(actors, placement):
        first = 1
        for w in plan.workers:
            options = placement.options[first:first + len(w.split)]
            first += len(w.split)
            stages = spawn_stages(config, w.layout, w.model, w.split, w.hops, options, cluster,
                                  lambda i, name=w.name: f"stage{i}@{name}")
            actors += stages
            down = w.hops[-1]
            federated.append(RayFederatedWorker(
                w.name, stages, links.emulated(down.spec, w.layout.emulate, real_network=cluster), down.name))
        draft = spawn_draft(config, everyone, placement.options[0], cluster, plan.workers[0].hops[0])
        actors += [draft] if draft is not None else []
        start(actors, calls, config, plan.info)
    target = RayFederatedTarget(federated, draft, plan.settings, RayTraffic(actors, calls), plan.info.vocab_size,
                                calls, plan.workers[0].hops[0].name)
    # Every worker processes every round alike: one set of target positions serves them all.
    return ray_backend(target, draft, actors, placement, calls, plan.info, plan.tokenizer, everyone, cluster,
                       plan.device_links, 1)


__all__ = ["RayFederatedTarget", "RayFederatedWorker", "build_federated_ray"]
