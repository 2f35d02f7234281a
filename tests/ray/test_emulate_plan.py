"""The plan of `specmesh emulate` (a pure function of the topology: no root, no Ray, no command run)."""
from __future__ import annotations

import json

import pytest

from specmesh.cluster import emulate, netns
from specmesh.cluster.emulate_plan import (GCS_PORT, RAY_HEAD, RAY_NONE, RAY_WORKER, Shape, job_topology,
                                           make_plan, owned, shaping_commands)
from specmesh.cluster.topology import example_path, load_topology

THREE = load_topology(example_path("three_nodes"))  # addresses 10.213.0.1-3; 10 Mbit/s device uplink
TINY = load_topology(example_path("tiny"))  # no addresses; cores 0 / 1 / 1

WITH_DRIVER_AND_CLIENT = """
[models]
target = "tiny"
[[nodes]]
name = "dev"
role = "device"
[[nodes]]
name = "e1"
role = "edge"
[[nodes]]
name = "sched"
role = "driver"
[[nodes]]
name = "laptop"
role = "client"
"""


def test_one_host_per_node_plus_a_client_on_the_subnet():
    plan = make_plan(THREE)
    assert [h.name for h in plan.hosts] == ["device", "edge1", "edge2", "client"]
    assert [h.address for h in plan.hosts] == ["10.213.0.1", "10.213.0.2", "10.213.0.3", "10.213.0.4"]
    assert [h.netns for h in plan.hosts] == ["smx-h-device", "smx-h-edge1", "smx-h-edge2", "smx-h-client"]
    assert [h.port for h in plan.hosts] == ["p0", "p1", "p2", "p3"]
    assert [h.ray for h in plan.hosts] == [RAY_HEAD, RAY_WORKER, RAY_WORKER, RAY_NONE]
    assert plan.bridge_netns == "smx-br" and plan.head == "device" and plan.client == "client"
    assert plan.gcs_address == f"10.213.0.1:{GCS_PORT}" and plan.dashboard_url == "http://10.213.0.1:8265"
    assert plan.host("edge1").resources == {"specmesh_edge1": 1}


def test_a_custom_subnet_and_prefix_rename_everything():
    plan = make_plan(TINY, subnet="192.168.77.0/28", prefix="smxt1-")
    assert [h.address for h in plan.hosts] == ["192.168.77.1", "192.168.77.2", "192.168.77.3", "192.168.77.4"]
    assert plan.bridge_netns == "smxt1-br" and all(h.netns.startswith("smxt1-h-") for h in plan.hosts)
    assert all(owned(h.netns, "smxt1-") and not owned(h.netns, "smx-") for h in plan.hosts)
    assert not owned("smxt1-other", "smxt1-") and not owned("smn-1-0-br", "smx-")


def test_bad_values_are_named():
    with pytest.raises(ValueError, match=r"nodes.device.address = '10.213.0.1': not a host address of subnet"):
        make_plan(THREE, subnet="192.168.5.0/24")
    with pytest.raises(ValueError, match="subnet = '8.8.8.0/24': must be a private IPv4 subnet"):
        make_plan(TINY, subnet="8.8.8.0/24")
    with pytest.raises(ValueError, match="subnet = '10.9.0.0/30': 4 hosts do not fit"):
        make_plan(TINY, subnet="10.9.0.0/30")
    with pytest.raises(ValueError, match="prefix = 'Bad_': must match"):
        make_plan(TINY, prefix="Bad_")
    with pytest.raises(ValueError, match="head = 'nowhere': must be a Ray node"):
        make_plan(TINY, head="nowhere")
    with pytest.raises(ValueError, match="num_cpus = 0"):
        make_plan(TINY, num_cpus=0)
    with pytest.raises(ValueError, match="node = 'edge9': no such host; hosts: device, edge1, edge2, client"):
        make_plan(TINY).host("edge9")


def test_the_driver_node_holds_the_head_and_a_client_node_is_the_client():
    plan = make_plan(load_topology(WITH_DRIVER_AND_CLIENT))
    assert plan.head == "sched" and plan.client == "laptop"
    assert [(h.name, h.ray) for h in plan.hosts] == [("dev", RAY_WORKER), ("e1", RAY_WORKER),
                                                     ("sched", RAY_HEAD), ("laptop", RAY_NONE)]


def test_egress_follows_the_links_per_direction():
    plan = make_plan(THREE)
    assert plan.host("device").egress == (Shape(None, 10.0),)  # 10 Mbit/s to every peer: one tbf
    assert plan.host("edge1").egress == (Shape("10.213.0.1", 50.0), Shape("10.213.0.3", 100.0))
    assert plan.host("client").egress == ()
    cmds = [" ".join(c) for c in plan.network_commands()]
    assert "tc -n smx-h-device qdisc add dev eth0 root tbf rate 10000kbit burst 12500b latency 400ms" in cmds
    assert "tc -n smx-h-edge1 class add dev eth0 parent 1: classid 1:2 htb rate 50000kbit burst 62500b " \
           "quantum 60000" in cmds
    assert "tc -n smx-h-edge1 filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip dst " \
           "10.213.0.3/32 flowid 1:3" in cmds
    assert not any("netem" in c for c in cmds)
    assert not any(c.startswith("tc -n smx-h-client") for c in cmds)


def test_with_netem_every_peer_gets_its_latency():
    plan = make_plan(THREE, netem=True)
    assert plan.host("device").egress == (Shape("10.213.0.2", 10.0, 50.0), Shape("10.213.0.3", 10.0, 50.0))
    cmds = [" ".join(c) for c in plan.network_commands()]
    assert "tc -n smx-h-device qdisc add dev eth0 parent 1:2 handle 2: netem delay 50ms limit 100000" in cmds
    unlimited = make_plan(TINY, netem=True).host("edge1").egress  # 1000 Mbit/s, 2 ms
    assert unlimited == (Shape("10.213.0.1", 1000.0, 2.0), Shape("10.213.0.3", 1000.0, 2.0))


def test_a_catch_all_rule_cannot_mix_with_per_peer_rules():
    with pytest.raises(ValueError, match="peer None"):
        shaping_commands("smx-h-a", [Shape(None, 10.0), Shape("10.0.0.2", 5.0)])
    assert shaping_commands("smx-h-a", []) == []


def test_every_command_acts_inside_a_namespace_of_the_plan():
    plan = make_plan(THREE, netem=True)
    ours = {plan.bridge_netns, *(h.netns for h in plan.hosts)}
    for cmd in plan.network_commands():
        if cmd[:3] == ["ip", "netns", "add"]:
            assert cmd[3] in ours, cmd
        else:
            assert cmd[0] in ("ip", "tc") and cmd[1] == "-n" and cmd[2] in ours, cmd
            if "netns" in cmd:  # a veth end moved: only into one of ours
                assert cmd[cmd.index("netns") + 1] in ours, cmd


def test_ray_commands_carry_resources_cores_and_the_head_address():
    plan = make_plan(TINY)
    head = plan.ray_command("device", "/venv/bin/ray", "/tmp/x/r0")
    assert head[:3] == ["taskset", "-c", "0"] and head[3:5] == ["/venv/bin/ray", "start"]
    assert "--head" in head and "--dashboard-host=0.0.0.0" in head and "--node-ip-address=10.213.0.1" in head
    assert f"--resources={json.dumps({'specmesh_device': 1})}" in head and "--num-cpus=1" in head
    assert "--block" in head and "--temp-dir=/tmp/x/r0" in head
    worker = plan.ray_command("edge2", "ray", "/tmp/x/r2")
    assert worker[:3] == ["taskset", "-c", "1"] and "--address=10.213.0.1:6379" in worker
    assert "--head" not in worker and "--node-ip-address=10.213.0.3" in worker
    assert make_plan(THREE).ray_command("edge1", "ray", "t")[0] == "ray"  # no cores named: no taskset
    assert "--num-cpus=3" in make_plan(TINY, num_cpus=3).ray_command("edge1", "ray", "t")
    with pytest.raises(ValueError, match="the client host runs no Ray"):
        plan.ray_command("client", "ray", "t")


def test_the_job_topology_has_the_hosts_addresses_and_adds_only_what_the_kernel_does_not():
    plan = make_plan(TINY)
    job = load_topology(job_topology(TINY, plan))
    assert job.emulate == "latency" and job.node("edge2").address == "10.213.0.3"
    assert job.link("device", "edge1") == TINY.link("device", "edge1") and job.stages == TINY.stages
    assert load_topology(job_topology(TINY, make_plan(TINY, netem=True))).emulate == "off"


def test_missing_root_or_iproute2_is_named(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(emulate.EmulateError, match="network namespaces need root"):
        emulate.require_root()
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "tc" else f"/usr/sbin/{tool}")
    with pytest.raises(emulate.EmulateError, match=r"`tc` not found: install iproute2"):
        emulate.require_root()
