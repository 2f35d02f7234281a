"""`specmesh emulate` with Ray on 3 real hosts (device, edge1, edge2: cluster/examples/tiny.toml) and a
client: `ray job submit` from the client runs a generation, a partition makes a call time out and heal
makes the next succeed, `kill` ends a node, `down` leaves nothing behind. All through the command line."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from specmesh.cluster import emulate, netns
from specmesh.cluster.topology import example_path

pytestmark = [pytest.mark.netns, pytest.mark.ray]

PREFIX = f"smxr{os.getpid() % 100000}-"
CLI = [sys.executable, "-m", "specmesh.cluster.emulate_cli"]
UP_S = 300
JOB_S = 420
CALL_S = 3.0  # a call across a partition gives up after this
HEALED_S = 30.0  # the first call after heal may wait for TCP's retransmission timer
NODE_GONE_S = 60.0  # a killed node is reported dead within this

# A driver on the head host: one actor per edge node; answers one JSON line per command on stdin.
DRIVER = """
import json, sys, time, ray
ray.init(log_to_driver=False)

@ray.remote(num_cpus=0)
class Pong:
    def ping(self):
        return ray.util.get_node_ip_address()

actors = {n: Pong.options(resources={f"specmesh_{n}": 0.01}).remote() for n in ("edge1", "edge2")}
print(json.dumps({name: ray.get(a.ping.remote(), timeout=60) for name, a in actors.items()}), flush=True)
for line in sys.stdin:
    cmd, arg, timeout = line.split()
    start = time.monotonic()
    if cmd == "call":
        try:
            reply = {"ok": True, "ip": ray.get(actors[arg].ping.remote(), timeout=float(timeout))}
        except ray.exceptions.GetTimeoutError:
            reply = {"ok": False, "error": "timeout"}
    else:  # alive: is a live node on address arg?
        deadline = start + float(timeout)
        while True:
            alive = arg in {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        reply = {"ok": alive}
    print(json.dumps({**reply, "s": time.monotonic() - start}), flush=True)
"""


def cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args, "--prefix", PREFIX] if args[0] != "exec" else
                          [*CLI, "exec", "--prefix", PREFIX, *args[1:]],
                          capture_output=True, text=True, timeout=timeout, env=env)


def ours() -> list[str]:
    return [n for n in netns.netns_list() if n.startswith(PREFIX)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`emulate up` of tiny.toml; `emulate down` afterwards whatever happened, checked."""
    reason = netns.unavailable_reason(f"{PREFIX}probe")
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "SPECMESH_CACHE": str(tmp_path_factory.mktemp("models"))}
    try:
        result = cli("up", "--topology", str(example_path("tiny")), timeout=UP_S, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        print(result.stdout)
        yield emulate.load_state(PREFIX), result.stdout
    finally:
        pids = [p for n in ours() for p in netns.pids(n)]
        down = cli("down", timeout=120)
        print(down.stdout, down.stderr)
        assert down.returncode == 0 and not ours(), down.stdout + down.stderr
        assert not [p for p in pids if netns.alive(p)]


@pytest.fixture(scope="module")
def driver(cluster):
    state, _ = cluster
    proc = subprocess.Popen([*CLI, "exec", "--prefix", PREFIX, state["head"], "--", "python", "-c", DRIVER],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    first = json.loads(proc.stdout.readline() or "null")
    assert first == {"edge1": "10.213.0.2", "edge2": "10.213.0.3"}, first

    def ask(cmd: str, arg: str, timeout: float) -> dict:
        proc.stdin.write(f"{cmd} {arg} {timeout}\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    yield ask
    proc.stdin.close()
    proc.wait(timeout=30)


def test_a_failed_up_tears_down_what_it_built():
    prefix = f"smxf{os.getpid() % 100000}-"
    reason = netns.unavailable_reason(f"{prefix}probe")
    if reason:
        pytest.skip(reason)
    result = subprocess.run([*CLI, "up", "--topology", str(example_path("tiny")), "--prefix", prefix,
                             "--timeout", "0.2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the cluster did not come up: 10.213.0.1:6379 did not accept a connection within 0.2 s" \
        in result.stderr, result.stderr
    assert not [n for n in netns.netns_list() if n.startswith(prefix)]
    assert not emulate.state_dir(prefix).exists()


def test_up_starts_ray_on_every_host_with_its_resources_and_cores(cluster):
    state, summary = cluster
    assert "latency: application: this kernel has no netem" in summary or "latency: kernel: netem" in summary
    assert f"exec --prefix {PREFIX} client -- ray job submit --address {state['dashboard']}" in summary
    assert state["dashboard"] == "http://10.213.0.1:8265" and state["ray"] is True
    hosts = {h["name"]: h for h in state["hosts"]}
    assert {n: h["address"] for n, h in hosts.items()} == {
        "device": "10.213.0.1", "edge1": "10.213.0.2", "edge2": "10.213.0.3", "client": "10.213.0.4"}
    assert hosts["client"]["pid"] is None and not netns.pids(hosts["client"]["netns"])
    for name, cores in (("device", [0]), ("edge1", [1]), ("edge2", [1])):
        assert netns.alive(hosts[name]["pid"]) and hosts[name]["node_id"], name
        pids = netns.pids(hosts[name]["netns"])
        assert len(pids) > 1, name  # ray start, raylet, ...
        assert all(sorted(os.sched_getaffinity(p)) == cores for p in pids if netns.alive(p)), name
    print(f"emulate up took {state['up_s']} s")


def test_ray_job_submit_from_the_client_runs_a_generation(cluster):
    state, summary = cluster
    # The command `up` printed, with a prompt the tiny models take.
    printed = shlex.split(next(line for line in summary.splitlines() if "ray job submit" in line))
    assert printed[:3] == ["specmesh", "emulate", "exec"] and printed[-2] == "--prompt", printed
    assert printed[printed.index("--topology") + 1] == state["job_topology"]
    result = subprocess.run([*CLI, *printed[2:-2], "--prompt-ids", "1,2,3,4", "--max-new-tokens", "16",
                             "--dtype", "float32"], capture_output=True, text=True, timeout=JOB_S)
    logs = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in logs, logs[-6000:]
    assert "backend=cluster" in logs and "workers ready" in logs, logs[-6000:]
    header = next(line for line in logs.splitlines() if line.startswith("┃ variant"))
    row = next(line for line in logs.splitlines() if line.startswith("│ specmesh "))
    table = dict(zip([c.strip() for c in header.split("┃")[1:-1]], [c.strip() for c in row.split("│")[1:-1]]))
    assert table["tokens"] == "16" and float(table["tok/s"]) > 0, table


def test_a_partition_times_out_a_call_and_heal_lets_the_next_succeed(cluster, driver):
    assert driver("call", "edge1", HEALED_S)["ok"]
    assert cli("partition", "edge1").returncode == 0
    try:
        cut = driver("call", "edge1", CALL_S)
        assert cut["ok"] is False and cut["error"] == "timeout", cut
    finally:
        assert "edge1: veth up" in cli("heal").stdout
    healed = driver("call", "edge1", HEALED_S)
    assert healed == {**healed, "ok": True, "ip": "10.213.0.2"}, healed
    print(f"first call after heal: {healed['s']:.2f} s")
    # Between two hosts only: the head (device) loses edge1, never edge2.
    assert cli("partition", "device", "edge1").returncode == 0
    try:
        assert driver("call", "edge1", CALL_S)["ok"] is False
        assert driver("call", "edge2", HEALED_S)["ok"]
    finally:
        cli("heal")
    assert driver("call", "edge1", HEALED_S)["ok"]


def test_kill_ends_every_process_of_a_node_and_ray_sees_it_die(cluster, driver):
    state, _ = cluster
    edge2 = next(h for h in state["hosts"] if h["name"] == "edge2")
    before = netns.pids(edge2["netns"])
    result = cli("kill", "edge2")
    assert result.returncode == 0 and f"edge2: {len(before)} process(es) ended" in result.stdout, result.stdout
    assert not netns.pids(edge2["netns"]) and not [p for p in before if netns.alive(p)]
    assert edge2["netns"] in netns.netns_list()  # the host stays, only its processes are gone
    assert driver("alive", "10.213.0.3", NODE_GONE_S)["ok"] is False
    assert driver("call", "edge1", HEALED_S)["ok"]  # the rest of the cluster keeps working
    assert netns.alive(next(h for h in state["hosts"] if h["name"] == "device")["pid"])


def test_down_leaves_no_namespace_veth_rule_or_process(cluster):
    state, _ = cluster
    pids = [p for n in ours() for p in netns.pids(n)]
    links_before = netns.ip("-o", "link").stdout.count("\n")
    start = time.monotonic()
    result = cli("down", timeout=120)
    took = time.monotonic() - start
    assert result.returncode == 0 and "5 namespace(s) deleted" in result.stdout, result.stdout + result.stderr
    assert not ours() and not [p for p in pids if netns.alive(p)]
    assert netns.ip("-o", "link").stdout.count("\n") == links_before  # the root namespace never had ours
    assert not [line for line in netns.ip("-o", "link").stdout.splitlines() if PREFIX in line]
    assert not emulate.state_dir(PREFIX).exists()
    assert cli("down").stdout.startswith("down in ")  # twice is fine
    print(f"emulate down took {took:.2f} s ({len(pids)} processes)")
