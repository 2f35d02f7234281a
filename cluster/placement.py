"""Where the Ray backends' actors run: a process each in ``local`` mode; pinned to their topology
nodes by custom resources, inside one placement group, in ``cluster`` mode; and where a worker whose
node is gone may run instead (:func:`stand_in`)."""
from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .remote_calls import LOAD_TIMEOUT_S
from .topology import Topology

# A sliver of a node's custom resource pins an actor to that node without limiting how many land.
PIN = 0.001
# Every worker's environment. glibc raises its mmap threshold to the largest block freed, after
# which the KV tensors that each session re-allocates every round (a little larger each time) come
# from the heap and fragment it: 16 interleaved sessions left ~300 MiB on each stage (tiny model,
# 512 wide) that never came back, and every further round of 16 added ~50-100. A fixed threshold
# keeps blocks above 128 KiB in mappings of their own, returned to the system when freed.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
RUNTIME_ENV = {"env_vars": WORKER_ENV}


@dataclass
class Placement:
    options: list[dict]  # Ray actor options per worker: draft first, then each stage
    group: object | None = None  # the placement group, removed on shutdown


def place(topology: Topology, cluster: bool) -> Placement:
    """Actor options: in ``local`` mode every worker just gets a process; in ``cluster`` mode each is
    pinned to its topology node by that node's custom resource, inside one placement group."""
    hosts = [topology.device.name, *topology.stages]
    if not cluster:
        return Placement([{"num_cpus": 0, "runtime_env": RUNTIME_ENV} for _ in hosts])
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
        {"num_cpus": 0, "runtime_env": RUNTIME_ENV, "scheduling_strategy": PlacementGroupSchedulingStrategy(group, i)}
        for i in range(len(hosts))
    ]
    return Placement(options, group)


def stand_in(topology: Topology, host: str) -> dict | None:
    """Ray actor options that start a worker of node ``host`` on another node once ``host`` is gone:
    pinned by the resources that ``host`` shares with other topology nodes (a class of machine, such
    as ``specmesh_edge = 1`` on every edge server), outside the placement group. None when ``host``
    shares none: no node can stand in for it, and losing it ends the generation."""
    own = topology.node(host).resources
    shared = sorted({k for n in topology.nodes if n.name != host for k in n.resources if k in own})
    return {"num_cpus": 0, "runtime_env": RUNTIME_ENV, "resources": {k: PIN for k in shared}} if shared else None
