"""The CPU cores a topology node owns: the forms a file may use, what is refused, and the questions
asked of a pinned layout (threads per actor, device/stage overlap, this machine's cores)."""
from __future__ import annotations

import re

import pytest

from specmesh.cluster.cores import cpu_list, parse_cores, usable_cores
from specmesh.cluster.topology import Models, Node, Topology, check_threads, example_path, load_topology

DEVICE_ONLY = """
stages = ["edge1"]

[models]
target = "tiny"

[[nodes]]
name = "device"
role = "device"
cores = CORES

[[nodes]]
name = "edge1"
role = "edge"
"""


@pytest.mark.parametrize("value, cores", [([0], (0,)), ("0-1", (0, 1)), ([3, 1], (1, 3)), ("0-1,4", (0, 1, 4)),
                                          (" 2 - 3 , 7", (2, 3, 7)), ("5", (5,))])
def test_cores_forms(value, cores):
    assert parse_cores(value) == cores
    topo = load_topology(DEVICE_ONLY.replace("CORES", repr(value).replace("'", '"')))
    assert topo.cores_for("device") == cores and topo.threads_for("device") == len(cores)
    assert topo.cores_for("edge1") is None and topo.threads_for("edge1") is None


@pytest.mark.parametrize("value, says", [
    ([], "names no core"), ("", "item ''"), ([0, 0], "core 0 listed twice"), ("0-3,2", "core 2 listed twice"),
    ([-1], "core -1 is not an integer >= 0"), ([True], "core True"), ("3-1", "range 3-1 runs backwards"),
    ("0;1", "item '0;1'"), ("x", "item 'x'"), (4, "must be a list"), ({"a": 1}, "must be a list"),
])
def test_bad_cores_say_what_is_wrong(value, says):
    with pytest.raises(ValueError) as info:
        Node("n", "edge", cores=value)
    assert str(info.value).startswith(f"cores = {value!r}: ") and says in str(info.value), str(info.value)


def test_cpu_list_is_compact_and_reads_back():
    assert cpu_list([5, 0, 1, 2, 9, 10]) == "0-2,5,9-10"
    assert cpu_list([]) == ""
    assert parse_cores(cpu_list([7, 3, 4, 0])) == (0, 3, 4, 7)


def _pinned(device, *edges, stages=None) -> Topology:
    """A device and edge nodes with the given cores (None = unpinned); by default one stage per edge."""
    nodes = (Node("device", "device", cores=device),
             *(Node(f"edge{i + 1}", "edge", cores=c) for i, c in enumerate(edges)))
    return Topology(nodes=nodes, links=(), models=Models("tiny"),
                    stages=stages or tuple(f"edge{i + 1}" for i in range(len(edges))))


def test_device_cores_disjoint_exactly_when_no_stage_shares_or_lacks_cores():
    assert _pinned([0], [1], [2, 3]).device_cores_disjoint()
    assert _pinned([0], [1], [1]).device_cores_disjoint()  # stages may share: they run one after another
    assert not _pinned([0, 1], [1], [2]).device_cores_disjoint()  # core 1 on both sides
    assert not _pinned([0], [1], None).device_cores_disjoint()  # a stage that may run anywhere
    assert not _pinned(None, [1], [2]).device_cores_disjoint()  # a draft that may run anywhere
    assert not _pinned([0], [1], stages=("edge1", "device")).device_cores_disjoint()  # a stage on the device
    assert _pinned([0], [1], None, stages=("edge1",)).device_cores_disjoint()  # edge2 hosts no stage


def test_check_threads_refuses_more_threads_than_cores():
    topo = _pinned([0], [1, 2], [3, 4])
    check_threads(topo, 1)
    check_threads(topo, None)  # one per owned core
    with pytest.raises(ValueError) as info:
        check_threads(topo, 2)
    msg = str(info.value)
    assert msg.startswith("threads = 2: node 'device' owns 1 core(s) (nodes[0].cores = [0])"), msg
    check_threads(_pinned([0, 1], [2, 3], [4, 5]), 2)
    edge1 = re.escape("threads = 3: node 'edge1' owns 2 core(s) (nodes[1].cores = [3, 4])")
    with pytest.raises(ValueError, match=edge1):
        check_threads(_pinned([0, 1, 2], [3, 4], [5, 6, 7]), 3)
    check_threads(_pinned([0, 1], [2, 3], [4], stages=("edge1",)), 2)  # edge2 runs no actor
    check_threads(_pinned(None, None, None), 64)  # nothing pinned: nothing to refuse
    with pytest.raises(ValueError, match="threads = 0"):
        check_threads(topo, 0)
    with pytest.raises(ValueError, match=re.escape("threads = 2: node 'device' owns 1 core(s)")):
        check_threads(load_topology(example_path("one_machine")), 2)


def test_cores_are_checked_against_a_machine_only_when_asked():
    topo = _pinned([0], [1], [5])  # loads anywhere: another machine may have core 5
    topo.check_machine_cores(available={0, 1, 5})
    with pytest.raises(ValueError) as info:
        topo.check_machine_cores(available={0, 1, 2})
    assert str(info.value).startswith("nodes[2].cores = [5]: core(s) 5 of node 'edge2' not on this machine "
                                      "(usable cores: 0-2)"), str(info.value)
    here = usable_cores()
    _pinned([min(here)], [max(here)]).check_machine_cores()  # this process's own cores pass
    with pytest.raises(ValueError, match=re.escape(f"core(s) {max(here) + 1} of node 'edge1'")):
        _pinned([min(here)], [max(here) + 1]).check_machine_cores()
