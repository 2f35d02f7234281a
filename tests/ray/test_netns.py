"""Real hosts on one machine (network namespaces): reachability, tbf shaping, partitions, teardown."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from specmesh.cluster import netns
from specmesh.cluster.netns import NetnsHosts
from specmesh.cluster.topology import load_topology

pytestmark = pytest.mark.netns

PORT = 7700
SERVER_LIFETIME_S = 120  # the echo servers exit by themselves after this, teardown or not
MB = 1_000_000
SHAPED_MBPS = 10  # 1 MB at 10 Mbit/s: 0.8 s

# Read until EOF, reply with the sha256 of what came (so a reply costs the reverse direction nothing),
# one connection at a time, until the deadline.
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
sock = None
for _ in range(tries):
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
    except OSError as exc:
        print(json.dumps({"ok": False, "error": repr(exc)}))
        sys.exit(0)
if sock is None:
    print(json.dumps({"ok": False, "error": "refused"}))
    sys.exit(0)
start = time.monotonic()
sock.settimeout(30)
sock.sendall(payload)
sock.shutdown(socket.SHUT_WR)
echo = bytearray()
while chunk := sock.recv(65536):
    echo += chunk
ok = echo.decode() == hashlib.sha256(payload).hexdigest()
print(json.dumps({"ok": ok, "seconds": time.monotonic() - start}))
"""

TOPOLOGY = """
[models]
target = "tiny"

[[nodes]]
name = "device"
role = "device"

[[nodes]]
name = "edge1"
role = "edge"

[[links]]
a = "device"
b = "edge1"
up_mbps = 10
down_mbps = 1000
"""


@pytest.fixture(scope="module")
def net():
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with NetnsHosts(["device", "edge1"]) as hosts:
        for name in hosts.hosts:
            hosts.spawn(name, [sys.executable, "-c", SERVER, hosts.address(name), str(PORT),
                               str(SERVER_LIFETIME_S)])
        yield hosts


def transfer(net: NetnsHosts, src: str, dst: str, nbytes: int, *, timeout: float = 5.0, tries: int = 50) -> dict:
    """Send ``nbytes`` from host ``src`` to the echo server on ``dst``; the client's JSON report."""
    result = net.run(src, [sys.executable, "-c", CLIENT, net.address(dst), str(PORT), str(nbytes),
                           str(timeout), str(tries)], timeout=60)
    return json.loads(result.stdout)


def test_hosts_reach_each_other_over_tcp(net):
    assert net.address("device") != net.address("edge1")
    assert net.address("device").startswith("10.213.0.")
    assert transfer(net, "device", "edge1", 1000)["ok"]
    assert transfer(net, "edge1", "device", 1000)["ok"]
    found = net.run("device", ["sh", "-c", "command -v python"], timeout=10, env=netns.venv_env())
    assert found.stdout.strip() == str(Path(sys.executable).parent / "python")


def test_tbf_shaping_slows_a_transfer(net):
    fast = transfer(net, "device", "edge1", MB)
    net.shape("device", SHAPED_MBPS)
    try:
        slow = transfer(net, "device", "edge1", MB)
    finally:
        net.unshape("device")
    again = transfer(net, "device", "edge1", MB)
    modelled = MB * 8 / (SHAPED_MBPS * 1e6)
    assert fast["ok"] and slow["ok"] and again["ok"]
    assert slow["seconds"] >= 0.8 * modelled, (fast, slow)
    assert slow["seconds"] > 4 * fast["seconds"] and slow["seconds"] > 4 * again["seconds"], (fast, slow, again)


def test_shape_links_follows_the_topology_per_direction(net):
    topo = load_topology(TOPOLOGY)
    net.shape_links(topo)
    try:
        up = transfer(net, "device", "edge1", MB)  # device -> edge1 at 10 Mbit/s
        down = transfer(net, "edge1", "device", MB)  # edge1 -> device at 1000 Mbit/s
    finally:
        net.unshape("device")
        net.unshape("edge1")
    assert up["ok"] and down["ok"]
    assert up["seconds"] >= 0.8 * MB * 8 / (SHAPED_MBPS * 1e6), (up, down)
    assert down["seconds"] < up["seconds"] / 4, (up, down)


def test_link_down_partitions_and_link_up_heals(net):
    assert transfer(net, "device", "edge1", 1000)["ok"]
    net.link_down("edge1")
    try:
        start = time.monotonic()
        cut = transfer(net, "device", "edge1", 1000, timeout=1.0, tries=1)
        assert not cut["ok"] and time.monotonic() - start < 30, cut
    finally:
        net.link_up("edge1")
    assert transfer(net, "device", "edge1", 1000, timeout=5.0)["ok"]


def test_shape_rejects_bad_rates(net):
    with pytest.raises(ValueError, match="rate_mbps = 0"):
        net.shape("device", 0)
    with pytest.raises(ValueError, match="host = 'nowhere'"):
        net.shape("nowhere", 1)


def test_teardown_kills_every_process_and_deletes_the_namespaces():
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    hosts = NetnsHosts(["a", "b"]).start()
    ours = [hosts.bridge_netns, *(h.netns for h in hosts.hosts.values())]
    assert set(ours) <= set(netns.netns_list())
    tracked = hosts.spawn("a", ["sleep", "300"])
    # A daemon that teardown does not know of, as `ray start` leaves behind: found by `ip netns pids`.
    daemon_pid = int(hosts.run("b", ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], timeout=10).stdout)
    assert netns._pids(hosts.hosts["b"].netns) == [daemon_pid]
    hosts.teardown()
    assert tracked.poll() is not None
    assert not _alive(daemon_pid)
    assert not [name for name in netns.netns_list() if name.startswith(hosts.prefix)]
    hosts.teardown()  # idempotent


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie is dead, only not reaped yet
    except FileNotFoundError:
        return False
