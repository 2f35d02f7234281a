"""Topology files: examples load, bad files fail naming the key, splits, links, written files read back.

The cores each node owns are tested in ``test_cores.py``, the link model in ``test_links.py``."""
from __future__ import annotations

import math
import pickle
import re

import pytest

from specmesh.cluster.links import IDEAL, LinkSpec
from specmesh.cluster.topology import (
    Link,
    Models,
    Node,
    Topology,
    dump_topology,
    example_path,
    load_topology,
    single_machine,
)

# A valid file that each bad case below changes in one place.
BASE = """
stages = ["edge1", "edge2"]
split = "even"

[models]
draft = "tiny:d"
target = "tiny:t"

[default_link]
latency_ms = 5
bandwidth_mbps = 100

[[nodes]]
name = "device"
role = "device"
resources = { specmesh_device = 1 }

[[nodes]]
name = "edge1"
role = "edge"

[[nodes]]
name = "edge2"
role = "edge"

[[links]]
a = "device"
b = "edge1"
latency_ms = 20
up_mbps = 10
down_mbps = 50
"""


def edit(old: str, new: str) -> str:
    assert BASE.count(old) == 1, old
    return BASE.replace(old, new)


def test_base_is_valid():
    topo = load_topology(BASE)
    assert topo.stages == ("edge1", "edge2") and topo.models.draft == "tiny:d"


@pytest.mark.parametrize("name", ["one_machine", "one_machine_50ms", "three_nodes", "tiny"])
def test_examples_load(name):
    topo = load_topology(example_path(name))
    assert topo.device.name == "device"
    assert topo.num_stages == 2
    assert topo.models.target and topo.models.draft
    assert pickle.loads(pickle.dumps(topo)) == topo  # Ray ships it to actors


def test_three_nodes_example_contents():
    topo = load_topology(example_path("three_nodes"))
    assert [n.resources for n in topo.nodes] == [
        {"specmesh_device": 1}, {"specmesh_edge1": 1}, {"specmesh_edge2": 1}]
    assert topo.link("device", "edge1") == LinkSpec(50, 10)
    assert topo.link("edge2", "device") == LinkSpec(50, 50)
    assert topo.link("edge1", "edge2") == LinkSpec(50, 100)
    assert topo.node("edge1").address == "10.213.0.2"


def test_example_path_unknown_name():
    with pytest.raises(ValueError, match="example = 'nope'.*three_nodes"):
        example_path("nope")


BAD = {
    "unknown role": (edit('name = "edge2"\nrole = "edge"', 'name = "edge2"\nrole = "gpu"'),
                     "nodes[2].role = 'gpu'"),
    "missing role": (edit('name = "edge2"\nrole = "edge"', 'name = "edge2"'), "nodes[2].role = None"),
    "missing target": (edit('target = "tiny:t"\n', ""), "models.target = None"),
    "empty target": (edit('target = "tiny:t"', 'target = ""'), "models.target = ''"),
    "unknown weights": (edit('target = "tiny:t"', 'target = "tiny:t"\nweights = "int3"'), "models.weights = 'int3'"),
    "stage on unknown node": (edit('stages = ["edge1", "edge2"]', 'stages = ["edge1", "edge9"]'),
                              "stages[1] = 'edge9'"),
    "empty stages": (edit('stages = ["edge1", "edge2"]', "stages = []"), "stages = []"),
    "negative link latency": (edit("latency_ms = 20", "latency_ms = -5"), "links[0].latency_ms = -5"),
    "negative default latency": (edit("latency_ms = 5", "latency_ms = -1"), "default_link.latency_ms = -1"),
    "latency not a number": (edit("latency_ms = 20", 'latency_ms = "20ms"'), "links[0].latency_ms = '20ms'"),
    "zero bandwidth": (edit("up_mbps = 10", "up_mbps = 0"), "links[0].up_mbps = 0"),
    "negative default bandwidth": (edit("bandwidth_mbps = 100", "bandwidth_mbps = -1"),
                                   "default_link.bandwidth_mbps = -1"),
    "duplicate node name": (edit('name = "edge2"', 'name = "edge1"'), "nodes[2].name = 'edge1'"),
    "bad node name": (edit('name = "edge2"', 'name = "edge 2"'), "nodes[2].name = 'edge 2'"),
    "misspelt link key": (edit("latency_ms = 20", "lateny_ms = 20"), "links[0].lateny_ms = 20"),
    "unknown top-level key": ("colour = 1\n" + BASE, "colour = 1"),
    "unknown node key": (edit('role = "device"', 'role = "device"\ncpus = 2'), "nodes[0].cpus = 2"),
    "negative core": (edit('role = "device"', 'role = "device"\ncores = [-1]'), "nodes[0].cores = [-1]"),
    "repeated core": (edit('name = "edge2"\nrole = "edge"', 'name = "edge2"\nrole = "edge"\ncores = "0-2,1"'),
                      "nodes[2].cores = '0-2,1'"),
    "core not an integer": (edit('role = "device"', 'role = "device"\ncores = [0.5]'), "nodes[0].cores = [0.5]"),
    "no device": (edit('role = "device"', 'role = "edge"'), "nodes = []"),
    "two devices": (edit('name = "edge2"\nrole = "edge"', 'name = "edge2"\nrole = "device"'),
                    "nodes = ['device', 'edge2']"),
    "no nodes": (BASE.split("[[nodes]]")[0], "nodes = None"),
    "link to unknown node": (edit('b = "edge1"', 'b = "nowhere"'), "links[0].b = 'nowhere'"),
    "link to itself": (edit('b = "edge1"', 'b = "device"'), "links[0].b = 'device'"),
    "link end missing": (edit('b = "edge1"\n', ""), "links[0].b = None"),
    "duplicate link": (BASE + '[[links]]\na = "edge1"\nb = "device"\n', "links[1] = 'edge1 <-> device'"),
    "layers per stage": (edit('split = "even"', "layers = [2, 2, 2]"), "layers = [2, 2, 2]"),
    "layer count zero": (edit('split = "even"', "layers = [2, 0]"), "layers[1] = 0"),
    "even with layers": (edit('split = "even"', 'split = "even"\nlayers = [1, 1]'), "layers = [1, 1]"),
    "split unknown": (edit('split = "even"', 'split = "memory"'), "split = 'memory'"),
    "split layers without layers": (edit('split = "even"', 'split = "layers"'), "layers = None"),
    "stage on a driver": (edit('name = "edge2"\nrole = "edge"', 'name = "edge2"\nrole = "driver"'),
                          "stages[1] = 'edge2'"),
    "negative resource": (edit("specmesh_device = 1", "specmesh_device = -1"),
                          "nodes[0].resources.specmesh_device = -1"),
    "bad emulate mode": (BASE.replace("[models]", '[link_model]\nemulate = "maybe"\n\n[models]'),
                         "link_model.emulate = 'maybe'"),
    "nodes not tables": (edit('split = "even"', 'split = "even"\nnodes = 5').split("[[nodes]]")[0],
                         "nodes = 5"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_names_the_key(case):
    text, key = BAD[case]
    with pytest.raises((ValueError, TypeError)) as info:
        load_topology(text)
    assert str(info.value).startswith(f"<text>: {key}"), str(info.value)


def test_bad_toml_syntax_and_file_name(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text(edit("latency_ms = 20", "latency_ms = -5"))
    with pytest.raises(ValueError, match=re.escape(f"{path}: links[0].latency_ms = -5")):
        load_topology(path)
    with pytest.raises(ValueError, match="<text>: "):
        load_topology("stages = [\n")


def test_validate_layers_when_the_model_is_known():
    topo = load_topology(BASE)
    topo.validate_layers(2)
    with pytest.raises(ValueError, match=re.escape("stages = ['edge1', 'edge2']: 2 stages but the target has 1")):
        topo.validate_layers(1)
    explicit = load_topology(edit('split = "even"', "layers = [3, 1]"))
    explicit.validate_layers(4)
    with pytest.raises(ValueError, match=re.escape("layers = [3, 1]: sum to 4 but the target has 5")):
        explicit.validate_layers(5)
    with pytest.raises(ValueError, match="num_layers = 0"):
        topo.validate_layers(0)


@pytest.mark.parametrize("num_layers", [1, 2, 3, 7, 24, 28])
@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_split_even_is_contiguous_and_balanced(num_layers, num_stages):
    topo = single_machine(num_stages, 0.0, math.inf, None, "tiny:t")
    if num_stages > num_layers:
        with pytest.raises(ValueError, match="stages"):
            topo.split_layers(num_layers)
        return
    ranges = topo.split_layers(num_layers)
    assert [i for r in ranges for i in r] == list(range(num_layers))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_split_even_and_explicit_values():
    assert single_machine(3, 0, 1, None, "t").split_layers(28) == [range(0, 10), range(10, 19), range(19, 28)]
    explicit = load_topology(edit('split = "even"', "layers = [3, 1]"))
    assert explicit.split_layers(4) == [range(0, 3), range(3, 4)]


def test_one_node_may_host_several_stages():
    topo = load_topology(edit('stages = ["edge1", "edge2"]', 'stages = ["edge1", "edge1", "edge2"]'))
    assert topo.split_layers(6) == [range(0, 2), range(2, 4), range(4, 6)]
    assert topo.round_hops() == [("device", "edge1"), ("edge1", "edge1"), ("edge1", "edge2"),
                                 ("edge2", "device")]
    assert topo.link("edge1", "edge1") is IDEAL


def test_stages_default_to_edge_nodes():
    topo = load_topology(edit('stages = ["edge1", "edge2"]\nsplit = "even"\n', ""))
    assert topo.stages == ("edge1", "edge2") and topo.layers is None


def test_link_lookup_is_direction_aware():
    topo = load_topology(BASE)
    assert topo.link("device", "edge1") == LinkSpec(20, 10)  # a -> b: up
    assert topo.link("edge1", "device") == LinkSpec(20, 50)  # b -> a: down
    assert topo.link("edge1", "edge2") == LinkSpec(5, 100)  # not listed: default
    assert topo.link("edge2", "device") == LinkSpec(5, 100)
    assert topo.link("device", "device") == IDEAL
    with pytest.raises(ValueError, match="node = 'edge9'"):
        topo.link("device", "edge9")


def test_link_direction_keys_override_both_way_keys():
    text = edit("latency_ms = 20\nup_mbps = 10\ndown_mbps = 50",
                "latency_ms = 20\ndown_latency_ms = 30\nbandwidth_mbps = 7\ndown_mbps = 50")
    topo = load_topology(text)
    assert topo.link("device", "edge1") == LinkSpec(20, 7)
    assert topo.link("edge1", "device") == LinkSpec(30, 50)
    partial = load_topology(edit("latency_ms = 20\n", ""))  # missing keys take the default link's
    assert partial.link("device", "edge1") == LinkSpec(5, 10)


def test_emulate_flag_accepts_booleans():
    on = load_topology(BASE.replace("[models]", "[link_model]\nemulate = true\n\n[models]"))
    off = load_topology(BASE.replace("[models]", "[link_model]\nemulate = false\n\n[models]"))
    assert (on.emulate, off.emulate, load_topology(BASE).emulate) == ("on", "off", "auto")


def test_single_machine():
    topo = single_machine(2, 20.0, 10.0, "tiny:d", "tiny:t")
    assert [n.name for n in topo.nodes] == ["device", "edge1", "edge2"]
    assert topo.stages == ("edge1", "edge2")
    assert topo.link("edge2", "device") == LinkSpec(20.0, 10.0)
    assert single_machine(1, 0, math.inf, None, "t").models.draft is None
    with pytest.raises(ValueError, match="num_stages = 0"):
        single_machine(0, 0, 1, None, "t")
    with pytest.raises(ValueError, match="latency_ms = -1"):
        single_machine(1, -1, 1, None, "t")


def test_topology_constructor_validates_too():
    topo = load_topology(BASE)
    with pytest.raises(ValueError, match="stages\\[0\\] = 'x'"):
        Topology(nodes=topo.nodes, links=(), models=topo.models, stages=("x",))


def test_examples_on_one_machine_own_disjoint_cores():
    for name in ("one_machine", "one_machine_50ms", "tiny"):
        topo = load_topology(example_path(name))
        assert topo.cores_for("device") == (0,)
        assert topo.cores_for("edge1") == topo.cores_for("edge2") == (1,)
        assert topo.device_cores_disjoint()
    three = load_topology(example_path("three_nodes"))  # separate machines: no core is named
    assert [three.cores_for(n.name) for n in three.nodes] == [None, None, None]
    assert not three.device_cores_disjoint()


FULL = Topology(
    nodes=(Node("device", "device", address="10.0.0.1", resources={"specmesh_device": 1}, cores="0-1"),
           Node("edge1", "edge", resources={"a b": 0.5}, cores=[2]), Node("edge2", "edge"),
           Node("client", "client", address="client.example")),
    links=(Link("device", "edge1", up=LinkSpec(20, 10), down=LinkSpec(30, 50)),
           Link("edge2", "edge1", up=LinkSpec(1.5, math.inf), down=LinkSpec(0, 1000))),
    models=Models(target="tiny:layers=4", draft="tiny-draft", weights="int4", draft_weights="int8"),
    stages=("edge1", "edge2", "edge2"),
    layers=(2, 1, 1), default_link=LinkSpec(5, math.inf), emulate="latency", name='quotes " and \\ and é',
)


@pytest.mark.parametrize("topo", [FULL, single_machine(3, 20.0, math.inf, None, "tiny"),
                                  *(load_topology(example_path(n)) for n in ("one_machine", "three_nodes", "tiny"))],
                         ids=["full", "single_machine", "one_machine", "three_nodes", "tiny"])
def test_dump_topology_reads_back_equal(topo):
    text = dump_topology(topo)
    assert load_topology(text) == topo
    assert dump_topology(load_topology(text)) == text  # and is a fixed point


def test_dump_topology_keeps_every_direction_of_a_link():
    back = load_topology(dump_topology(FULL))
    assert back.link("device", "edge1") == LinkSpec(20, 10) and back.link("edge1", "device") == LinkSpec(30, 50)
    assert back.link("edge1", "edge2") == LinkSpec(0, 1000) and back.link("edge2", "edge1") == LinkSpec(1.5)
    assert back.link("device", "edge2") == LinkSpec(5)  # not listed: the default
    assert back.split_layers(4) == [range(0, 2), range(2, 3), range(3, 4)]


def test_weight_formats_come_from_the_models_table_and_options_win(tmp_path):
    from specmesh.cluster.inproc import config_from_topology

    path = tmp_path / "t.toml"
    path.write_text(edit('target = "tiny:t"', 'target = "tiny:t"\nweights = "int4"\ndraft_weights = "dense"'))
    cfg = config_from_topology(str(path))
    assert (cfg.weights, cfg.draft_weights) == ("int4", "dense")
    assert config_from_topology(str(path), weights="int8").weights == "int8"
    assert config_from_topology(example_path("one_machine")).weights == "auto"  # not named: the default
