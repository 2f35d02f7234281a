"""The ``cluster`` backend on a real multi-node Ray on this machine (``ray.cluster_utils.Cluster``).

Workers land on the nodes that the topology names (by custom resource), the output equals the
in-process backend's and the target-only baseline's for 1 to 3 stages, and a topology that cannot
run (a resource the cluster lacks, a bad file) is refused before any actor starts.
"""
from __future__ import annotations

import re
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

from specmesh.cluster.inproc import config_from_topology
from specmesh.cluster.topology import example_path, load_topology
from specmesh.runtime import SpecConfig, SpecMesh, codec
from specmesh.runtime.messages import DraftProposal, OpenSession, SamplingParams, VerifyResult
from specmesh.runtime.sparse import SparseDist

from .conftest import DEVICE, EDGE1, EDGE2, actor_states, wait_dead

pytestmark = pytest.mark.ray

PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 128, 64]
NEW_TOKENS = 20

NODES = f"""
[[nodes]]
name = "device"
role = "device"
resources = {{ {DEVICE} = 1 }}

[[nodes]]
name = "edge1"
role = "edge"
resources = {{ {EDGE1} = 1 }}

[[nodes]]
name = "edge2"
role = "edge"
resources = {{ {EDGE2} = 1 }}
"""
MODELS = """
[models]
draft = "tiny-draft"
target = "tiny"
"""
ONE_STAGE = f'stages = ["edge2"]\n{MODELS}{NODES}'
# Two stages share edge1; the links are the default (ideal) ones.
THREE_STAGES = f'stages = ["edge1", "edge1", "edge2"]\nlayers = [1, 2, 1]\n{MODELS}{NODES}'


@pytest.fixture(scope="module")
def topologies(tmp_path_factory) -> dict[int, str]:
    """Topology files by stage count: the shipped tiny example (2 stages) and two written here."""
    folder = tmp_path_factory.mktemp("topologies")
    paths = {2: str(example_path("tiny"))}
    for stages, text in ((1, ONE_STAGE), (3, THREE_STAGES)):
        path = folder / f"tiny_{stages}.toml"
        path.write_text(text)
        paths[stages] = str(path)
    return paths


def _config(path: str, backend: str, cache: str) -> SpecConfig:
    return config_from_topology(path, backend=backend, dtype="float32", cache_dir=cache, threads=1,
                                max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def engines(ray_cluster, topologies, model_cache):
    """stages -> (cluster engine, inproc engine) on the same topology file."""
    with ThreadPoolExecutor(len(topologies)) as pool:
        futures = {n: pool.submit(SpecMesh, _config(p, "cluster", model_cache)) for n, p in topologies.items()}
    built = {n: f.result() for n, f in futures.items() if f.exception() is None}
    inproc = {}
    try:
        for f in futures.values():
            if f.exception() is not None:
                raise f.exception()
        inproc = {n: SpecMesh(_config(p, "inproc", model_cache)) for n, p in topologies.items()}
        yield {n: (built[n], inproc[n]) for n in topologies}
    finally:
        for engine in [*built.values(), *inproc.values()]:
            engine.close()


def test_the_example_names_the_cluster_resources():
    topology = load_topology(example_path("tiny"))
    assert {n.name: set(n.resources) for n in topology.nodes} == {
        "device": {DEVICE}, "edge1": {EDGE1}, "edge2": {EDGE2}}


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_workers_land_on_the_nodes_the_topology_names(engines, topologies, ray_cluster, stages):
    engine, _ = engines[stages]
    topology = load_topology(topologies[stages])
    hosts = {"draft": topology.device.name, **{f"stage{i}": h for i, h in enumerate(topology.stages)}}
    for worker in engine.backend.workers:
        (resource,) = topology.node(hosts[worker["role"]]).resources
        assert worker["node_id"] == ray_cluster.node_of[resource], worker["role"]
    assert len({w["pid"] for w in engine.backend.workers}) == stages + 1


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_greedy_output_equals_inproc_and_target_only(engines, stages):
    engine, inproc = engines[stages]
    reference = inproc.generate(PROMPT, draft=None).output_ids
    assert engine.generate(PROMPT, draft=None).output_ids == reference
    for gamma in (2, 5):
        got, want = engine.generate(PROMPT, gamma=gamma), inproc.generate(PROMPT, gamma=gamma)
        assert got.output_ids == reference, f"gamma {gamma}"
        assert 0 < got.stats.accepted < got.stats.drafted
        assert [r.accepted for r in got.stats.records] == [r.accepted for r in want.stats.records]
        assert (got.stats.bytes_up, got.stats.bytes_down) == (want.stats.bytes_up, want.stats.bytes_down)


def test_frames_go_from_stage_to_stage_without_the_driver(engines, ray_cluster):
    """Stage 0 (edge1) leaves its frame in its own node's object store and hands stage 1 (edge2) a
    reference: the hidden states never reach the device node, where the driver runs."""
    engine, _ = engines[2]
    first, last = engine.backend.target.stages
    opened = OpenSession("route", SamplingParams())
    ray.get([first.open.remote(codec.encode(opened)), last.open.remote(codec.encode(opened))], timeout=60)
    try:
        proposal = DraftProposal("route", 1, 0, PROMPT, torch.zeros(0, dtype=torch.int64), SparseDist.empty(256))
        hop = first.step.remote(ray.put(codec.encode(proposal)))
        assert isinstance(codec.decode(ray.get(last.step.remote(hop), timeout=60)), VerifyResult)
        frame = ray.get(hop, timeout=60)  # all the driver holds of stage 0's answer: a reference
        assert isinstance(frame, ray.ObjectRef)
        nodes = set(ray.experimental.get_object_locations([frame])[frame]["node_ids"])
        edge1, edge2 = ray_cluster.node_of[EDGE1], ray_cluster.node_of[EDGE2]
        assert edge1 in nodes and nodes <= {edge1, edge2}
    finally:
        ray.get([first.close.remote("route"), last.close.remote("route")], timeout=60)


def _refused_before_any_actor(config: SpecConfig, error: type, pattern: str) -> None:
    before = set(actor_states())
    with pytest.raises(error, match=pattern):
        SpecMesh(config)
    assert set(actor_states()) == before, "an actor was started"


def test_a_resource_the_cluster_lacks_is_refused_before_any_actor_starts(ray_cluster, tmp_path, model_cache):
    text = ONE_STAGE.replace(f"{EDGE2} = 1", "specmesh_edge9 = 1")
    path = tmp_path / "edge9.toml"
    path.write_text(text)
    groups = len(ray.util.placement_group_table())
    _refused_before_any_actor(_config(str(path), "cluster", model_cache), RuntimeError,
                              r"the Ray cluster lacks resources \['specmesh_edge9'\]")
    assert len(ray.util.placement_group_table()) == groups


def _break(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


BAD_FILES = {
    "unknown role": (_break(ONE_STAGE, 'role = "edge"', 'role = "gpu"'), ValueError,
                     "nodes[1].role = 'gpu': must be one of device, edge, driver, client"),
    "missing target model": (_break(ONE_STAGE, 'target = "tiny"', ""), ValueError,
                             "models.target = None: missing; name the target model"),
    "layer counts beyond the target": (_break(ONE_STAGE, 'stages = ["edge2"]', 'stages = ["edge1", "edge2"]\n'
                                       'split = "layers"\nlayers = [2, 3]'), ValueError,
                                "layers = [2, 3]: sum to 5 but the target has 4 layers"),
    "more stages than layers": (
        _break(ONE_STAGE, 'stages = ["edge2"]', 'stages = ["edge1", "edge1", "edge2", "edge2", "edge2"]'),
        ValueError, "stages = ['edge1', 'edge1', 'edge2', 'edge2', 'edge2']: 5 stages but the target has 4 layers"),
    "negative latency": (ONE_STAGE + '\n[default_link]\nlatency_ms = -5\n', ValueError,
                         "default_link.latency_ms = -5: must be a finite number of milliseconds >= 0"),
    "negative link latency": (ONE_STAGE + '\n[[links]]\na = "device"\nb = "edge2"\nup_latency_ms = -1\n',
                              ValueError, "links[0].up_latency_ms = -1: must be a finite number"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_topology_files_fail_before_any_actor_starts(ray_cluster, tmp_path, model_cache, case):
    text, error, message = BAD_FILES[case]
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent(text))
    stages = {"layer counts beyond the target": 2, "more stages than layers": 5}.get(case, 1)
    # The config names the models itself, so the error can only come from the file. Layer counts are
    # checked against the target's config once it is read (the file does not know them).
    config = SpecConfig(target="tiny", draft="tiny-draft", dtype="float32", cache_dir=model_cache,
                        backend="cluster", topology=str(path), num_stages=stages)
    where = "" if stages > 1 else f"{path}: "
    _refused_before_any_actor(config, error, re.escape(where + message))


def test_close_releases_the_actors_and_the_placement_group(ray_cluster, topologies, model_cache):
    before = set(actor_states())
    groups = set(ray.util.placement_group_table())
    config = SpecConfig(target="tiny", draft=None, dtype="float32", cache_dir=model_cache, threads=1,
                        backend="cluster", topology=topologies[1], num_stages=1, max_new_tokens=4)
    engine = SpecMesh(config)
    started = set(actor_states()) - before
    (group,) = set(ray.util.placement_group_table()) - groups
    assert len(engine.generate(PROMPT).output_ids) == 4
    engine.close()
    engine.close()  # twice is harmless
    assert len(started) == 1 and set(wait_dead(started).values()) == {"DEAD"}
    assert ray.util.placement_group_table()[group]["state"] == "REMOVED"


@pytest.mark.parametrize("kw", [dict(gamma=4), dict(gamma=3, tree_width=2),
                                dict(temperature=1.0, seed=7, gamma=4),
                                dict(temperature=0.8, seed=3, gamma=3, tree_width=3)])
def test_overlap_never_changes_the_output_on_the_cluster(engines, kw):
    """DSD overlap (the draft speculating on the verdict in its own process) on a multi-node
    cluster: greedy and seeded sampled outputs equal overlap off and the in-process backend."""
    engine, inproc = engines[2]
    on = engine.generate(PROMPT, overlap=True, **kw)
    off = engine.generate(PROMPT, overlap=False, **kw)
    want = inproc.generate(PROMPT, overlap=False, **kw)
    assert on.output_ids == off.output_ids == want.output_ids
    assert [r.accepted for r in on.stats.records] == [r.accepted for r in want.stats.records]
    assert on.stats.draft_counters["speculated"] > 0 and off.stats.draft_counters["speculated"] == 0
