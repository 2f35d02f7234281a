"""`specmesh emulate` without Ray (``up --no-ray``): real TCP between the hosts, no route out, tc shaping
as the topology says, both kinds of partition and heal, and ``down`` after a crash (no state file)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from specmesh.cluster import emulate, emulate_ops, netns

pytestmark = pytest.mark.netns

PREFIX = f"smxn{os.getpid() % 100000}-"  # this test's own: never another session's namespaces
PORT = 7700
SERVER_LIFETIME_S = 120  # the echo servers exit by themselves after this, down or not
MB = 1_000_000
CLI = [sys.executable, "-m", "specmesh.cluster.emulate_cli"]

# device -> edges at 10 Mbit/s (one tbf); edge1 -> edge2 at 20 Mbit/s, -> device at 1000 (htb per peer).
TOPOLOGY = """
[models]
target = "tiny"
[default_link]
bandwidth_mbps = 1000
[[nodes]]
name = "device"
role = "device"
[[nodes]]
name = "edge1"
role = "edge"
[[nodes]]
name = "edge2"
role = "edge"
[[links]]
a = "device"
b = "edge1"
up_mbps = 10
[[links]]
a = "device"
b = "edge2"
up_mbps = 10
[[links]]
a = "edge1"
b = "edge2"
bandwidth_mbps = 20
"""

# Read until EOF, reply with the sha256 of what came, one connection at a time, until the deadline.
SERVER = """
import hashlib, socket, sys, time
host, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
srv = socket.create_server((host, port))
srv.settimeout(0.5)
while time.monotonic() < deadline:
    try:
        conn, _ = srv.accept()
    except socket.timeout:
        continue
    with conn:
        conn.settimeout(10)
        data = bytearray()
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(hashlib.sha256(data).hexdigest().encode())
"""

# Connect (retrying while the server is not listening yet), send N bytes, check the digest; print JSON.
CLIENT = """
import hashlib, json, socket, sys, time
host, port, nbytes, timeout, tries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
payload = bytes(i % 251 for i in range(nbytes))
for _ in range(tries):
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
    except OSError as exc:
        print(json.dumps({"ok": False, "error": repr(exc)}))
        sys.exit(0)
else:
    print(json.dumps({"ok": False, "error": "refused"}))
    sys.exit(0)
start = time.monotonic()
sock.settimeout(30)
try:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    echo = bytearray()
    while chunk := sock.recv(65536):
        echo += chunk
except OSError as exc:
    print(json.dumps({"ok": False, "error": repr(exc)}))
    sys.exit(0)
print(json.dumps({"ok": echo.decode() == hashlib.sha256(payload).hexdigest(), "seconds": time.monotonic() - start}))
"""


def root_network() -> tuple[str, str, str]:
    """The root namespace's interfaces, routes and qdiscs: what emulate must never change."""
    names = [line.split(":")[1].split("@")[0].strip() for line in netns.ip("-o", "link").stdout.splitlines()]
    return (" ".join(sorted(names)), netns.ip("route").stdout, netns.run(["tc", "qdisc", "show"]).stdout)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    reason = netns.unavailable_reason(f"{PREFIX}probe")
    if reason:
        pytest.skip(reason)
    topology = tmp_path_factory.mktemp("topo") / "three.toml"
    topology.write_text(TOPOLOGY)
    before = root_network()
    try:
        state = emulate.up(topology, prefix=PREFIX, ray=False)
        for host in state["hosts"]:
            subprocess.Popen(netns.exec_argv(host["netns"], [sys.executable, "-c", SERVER, host["address"],
                                                              str(PORT), str(SERVER_LIFETIME_S)]))
        yield state
    finally:
        emulate.down(PREFIX)
        assert not [n for n in netns.netns_list() if n.startswith(PREFIX)]
        assert root_network() == before


def transfer(state: dict, src: str, dst: str, nbytes: int, *, timeout: float = 5.0, tries: int = 50) -> dict:
    """Send ``nbytes`` from host ``src`` to the echo server on ``dst`` (an address or a host name)."""
    addr = next((h["address"] for h in state["hosts"] if h["name"] == dst), dst)
    argv, env = emulate_ops.exec_command(state, src, [sys.executable, "-c", CLIENT, addr, str(PORT),
                                                      str(nbytes), str(timeout), str(tries)])
    return json.loads(subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60).stdout)


def test_hosts_reach_each_other_over_tcp_and_nothing_outside(net):
    addresses = {h["name"]: h["address"] for h in net["hosts"]}
    assert addresses == {"device": "10.213.0.1", "edge1": "10.213.0.2", "edge2": "10.213.0.3",
                         "client": "10.213.0.4"}
    for src, dst in (("device", "edge1"), ("edge2", "device"), ("client", "device"), ("edge1", "edge2")):
        assert transfer(net, src, dst, 1000)["ok"], (src, dst)
    outside = transfer(net, "device", "10.214.0.1", 1000, tries=1)
    assert not outside["ok"] and "Network is unreachable" in outside["error"], outside
    argv, env = emulate_ops.exec_command(net, "device", ["sh", "-c", "command -v python; echo $RAY_ADDRESS"])
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10).stdout.split()
    assert out == [os.path.join(os.path.dirname(sys.executable), "python"), "10.213.0.1:6379"]


def test_shaping_follows_the_topology_per_direction(net):
    up = transfer(net, "device", "edge1", MB)  # 10 Mbit/s: 0.8 s
    side = transfer(net, "edge1", "edge2", 2 * MB)  # 20 Mbit/s: 0.8 s
    back = transfer(net, "edge1", "device", 2 * MB)  # 1000 Mbit/s: 16 ms
    assert up["ok"] and side["ok"] and back["ok"]
    assert up["seconds"] >= 0.8 * MB * 8 / 10e6, (up, back)
    assert side["seconds"] >= 0.8 * 2 * MB * 8 / 20e6, (side, back)
    assert back["seconds"] < min(up["seconds"], side["seconds"]) / 4, (up, side, back)


def test_a_host_partition_cuts_it_off_and_heal_restores_it(net):
    emulate_ops.partition(net, "edge1")
    try:
        assert emulate_ops.status(net)[1]["link_up"] is False
        start = time.monotonic()
        cut = transfer(net, "device", "edge1", 1000, timeout=1.0, tries=1)
        assert not cut["ok"] and time.monotonic() - start < 30, cut
        assert transfer(net, "device", "edge2", 1000)["ok"]
    finally:
        assert emulate_ops.heal(net) == ["edge1: veth up"]
    assert transfer(net, "device", "edge1", 1000)["ok"]
    assert emulate_ops.heal(net) == []


def test_a_pair_partition_cuts_only_that_link(net):
    emulate_ops.partition(net, "device", "edge1")
    try:
        assert not transfer(net, "device", "edge1", 1000, timeout=1.0, tries=1)["ok"]
        assert not transfer(net, "edge1", "device", 1000, timeout=1.0, tries=1)["ok"]
        assert transfer(net, "edge1", "edge2", 1000)["ok"] and transfer(net, "device", "edge2", 1000)["ok"]
        assert [r["blackholed"] for r in emulate_ops.status(net)] == [["10.213.0.2"], ["10.213.0.1"], [], []]
    finally:
        emulate_ops.heal(net)
    assert transfer(net, "device", "edge1", 1000)["ok"] and transfer(net, "edge1", "device", 1000)["ok"]
    with pytest.raises(emulate.EmulateError, match="name two different hosts"):
        emulate_ops.partition(net, "edge1", "edge1")
    with pytest.raises(emulate.EmulateError, match="node = 'edge7': no such host"):
        emulate_ops.partition(net, "edge7")


def test_a_second_up_with_the_same_prefix_is_refused(net, tmp_path):
    (tmp_path / "t.toml").write_text(TOPOLOGY)
    with pytest.raises(emulate.EmulateError, match=f"an emulation with prefix '{PREFIX}' is up"):
        emulate.up(tmp_path / "t.toml", prefix=PREFIX, ray=False)


def test_down_after_a_crash_works_from_the_prefix_alone(tmp_path):
    prefix = f"smxc{os.getpid() % 100000}-"
    reason = netns.unavailable_reason(f"{prefix}probe")
    if reason:
        pytest.skip(reason)
    (tmp_path / "t.toml").write_text(TOPOLOGY)
    before = root_network()
    state = emulate.up(tmp_path / "t.toml", prefix=prefix, ray=False)
    ours = [state["bridge_netns"], *(h["netns"] for h in state["hosts"])]
    argv, env = emulate_ops.exec_command(state, "edge2", ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"])
    daemon = int(subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10).stdout)
    assert netns.pids(state["hosts"][2]["netns"]) == [daemon]
    (emulate.state_dir(prefix) / emulate.STATE_FILE).unlink()  # as if `up`'s process had died
    result = subprocess.run([*CLI, "down", "--prefix", prefix], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "5 namespace(s) deleted, 1 process(es) ended" in result.stdout, result
    assert not netns.alive(daemon) and not set(ours) & set(netns.netns_list())
    assert not emulate.state_dir(prefix).exists() and root_network() == before
    again = subprocess.run([*CLI, "down", "--prefix", prefix], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "0 namespace(s) deleted" in again.stdout
    missing = subprocess.run([*CLI, "status", "--prefix", prefix], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and f"no emulation with prefix '{prefix}' is up" in missing.stderr
