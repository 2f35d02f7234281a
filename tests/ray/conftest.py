"""Shared Ray fixtures: one local Ray per module, one multi-node Ray on this machine per module.

Every Ray process of the session (drivers, ``ray start`` heads, ``ray job submit``) uses the same
token authentication: ``RAY_AUTH_MODE=token`` and a session token in ``RAY_AUTH_TOKEN``, inherited by
every child process, so nothing is read from or written to ``~/.ray``. Clusters are kept small (2
CPUs of a shared machine); the workers themselves ask for no CPU (``num_cpus=0``), so they all fit.
"""
from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass

import pytest
import ray
import torch

torch.set_num_threads(1)

LOCAL_CPUS = 2
NODE_CPUS = 1  # per node of the multi-node cluster (3 nodes on a 2-core machine)
# The custom resources that cluster/examples/tiny.toml pins its nodes with, one per Ray node.
DEVICE, EDGE1, EDGE2 = "specmesh_device", "specmesh_edge1", "specmesh_edge2"
ACTOR_GONE_S = 30.0  # how long a killed actor may take to be reported DEAD


def _reload_ray_auth() -> None:
    # Ray caches the mode and the token in this process when it is imported: re-read both.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="session")
def ray_auth_env():
    """Token authentication, set the same way for every Ray process of the session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        _reload_ray_auth()
        yield dict(os.environ)
    _reload_ray_auth()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    """Model cache of the session (tiny models are written here once, by whichever process first
    needs them); passed to every engine as ``cache_dir``, so actors use it too."""
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def local_ray(ray_auth_env):
    """A local Ray for one test module: ``ray.init`` on this machine, shut down afterwards."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=LOCAL_CPUS, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class MultiNode:
    """A head and two worker nodes on this machine, each holding one SpecMesh custom resource."""

    cluster: object  # ray.cluster_utils.Cluster
    node_of: dict[str, str]  # custom resource -> id of the node that holds it


@pytest.fixture(scope="module")
def ray_cluster(ray_auth_env):
    """``ray.cluster_utils.Cluster``: head (``specmesh_device``, where the driver runs) and two worker
    nodes (``specmesh_edge1``, ``specmesh_edge2``), as ``cluster/examples/tiny.toml`` names them."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # dashboard_agent_listen_port=None: a free port, not the default one another Ray may hold.
    common = dict(num_cpus=NODE_CPUS, include_dashboard=False, dashboard_agent_listen_port=None)
    cluster = Cluster(initialize_head=True, head_node_args=dict(resources={DEVICE: 1}, **common))
    try:
        nodes = {DEVICE: cluster.head_node}
        for res in (EDGE1, EDGE2):
            nodes[res] = cluster.add_node(resources={res: 1}, **common)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield MultiNode(cluster, {res: node.node_id for res, node in nodes.items()})
    finally:
        ray.shutdown()
        cluster.shutdown()


def actor_states() -> dict[str, str]:
    """Every actor the connected Ray cluster has known: id -> state (ALIVE, DEAD, ...)."""
    from ray._private import state  # the GCS actor table; the public state API needs a dashboard

    return {aid: info["State"] for aid, info in state.actors().items()}


def wait_dead(actor_ids, timeout_s: float = ACTOR_GONE_S) -> dict[str, str]:
    """Waits until none of ``actor_ids`` is alive any more; returns their last states."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {a: s for a, s in actor_states().items() if a in set(actor_ids)}
        if all(s == "DEAD" for s in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(0.2)
