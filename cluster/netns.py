"""Several real hosts on one machine: one Linux network namespace per host, joined by a bridge.

Needs root and iproute2 (``ip``, ``tc``). Each host gets a namespace ``smn-<pid>-<n>-h-<name>`` with
``lo`` and one interface ``eth0`` holding an address on a private test subnet (10.213.0.0/24 by
default); the other end of its veth pair is a port of bridge ``br0``, which lives in a namespace of its
own (``smn-<pid>-<n>-br``). Veth pairs are created inside those namespaces, so nothing of the root
namespace (interfaces, routes, addresses) is touched, and the test subnet exists only in them.

    with NetnsHosts(["head", "edge1"]) as net:
        server = net.spawn("head", [sys.executable, "-m", "http.server", "--bind", net.address("head")])
        net.run("edge1", ["curl", f"http://{net.address('head')}:8000"])
        net.shape("edge1", 10)            # edge1's egress at 10 Mbit/s (tc tbf)
        net.link_down("edge1")            # a partition; link_up heals it

Teardown ends every process inside the namespaces by pid (``ip netns pids``: also what Ray daemonised
there), then deletes the namespaces; it runs on ``__exit__`` and, as a last resort, at interpreter exit.
There is no netem on some kernels: propagation delay stays in the application's link model
(:mod:`specmesh.cluster.links`, ``emulate = "latency"``); ``tc`` provides the bandwidth.
"""
from __future__ import annotations

import atexit
import ipaddress
import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from .links import BITS_PER_BYTE, BITS_PER_MEGABIT
from .topology import Topology

PREFIX = "smn-"  # every namespace SpecMesh creates starts with this
SUBNET = "10.213.0.0/24"  # private test subnet, used only inside our namespaces
BRIDGE = "br0"  # the bridge, inside the bridge namespace
HOST_IF = "eth0"  # a host's interface, inside its namespace
CMD_TIMEOUT_S = 10.0  # bound on every ip / tc call
KILL_GRACE_S = 3.0  # SIGTERM, then SIGKILL after this long
KILL_ROUNDS = 5  # processes may fork while dying: kill what remains this many times at most
POLL_S = 0.05
BURST_WINDOW_S = 0.01  # tbf/htb bucket: 10 ms of traffic at the shaped rate ...
MIN_BURST_BYTES = 4096  # ... but at least this (the 10 Mbit/s setting verified here: 32 kbit)
TBF_QUEUE_LATENCY_MS = 400  # how long tbf may queue a packet before dropping it
UNSHAPED_KBIT = 10_000_000  # the default class of a per-peer htb tree: 10 Gbit/s, i.e. unshaped
HTB_QUANTUM = 60_000  # bytes per htb round; silences the "quantum is big" warning at high rates
KBIT_PER_MBIT = 1000

_sequence = itertools.count()  # distinguishes several NetnsHosts of one process


def venv_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment with the running interpreter's folder first on PATH, plus ``extra``.

    Start ``ray start`` with it: a job's driver inherits the environment of the node's ``ray start``.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.update(extra or {})
    return env


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=check)


def _tc(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["tc", "-n", netns, *args], capture_output=True, text=True,
                          timeout=CMD_TIMEOUT_S, check=check)


def netns_list() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (not root, no iproute2, no permission), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"cannot create a network namespace: {exc}"
    _kill_and_delete(probe)
    return None


def _pids(netns: str) -> list[int]:
    result = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in result.stdout.split()]


def _kill_and_delete(netns: str) -> None:
    """End every process in ``netns`` by pid (TERM, then KILL), then delete it."""
    for _ in range(KILL_ROUNDS):
        pids = _pids(netns)
        if not pids:
            break
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + KILL_GRACE_S
            while time.monotonic() < deadline and set(pids) & set(_pids(netns)):
                time.sleep(POLL_S)
            pids = _pids(netns)
            if not pids:
                break
    _ip("netns", "del", netns, check=False)


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces left by SpecMesh processes that no longer run (killed before teardown).

    Only names ``<prefix><pid>-...`` whose pid is gone are touched, so other live sessions keep theirs.
    Returns the names deleted.
    """
    removed = []
    for name in netns_list():
        owner = name[len(prefix):].split("-", 1)[0] if name.startswith(prefix) else ""
        if not owner.isdigit():
            continue
        try:
            os.kill(int(owner), 0)
            continue  # its owner is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill_and_delete(name)
        removed.append(name)
    return removed


@dataclass(frozen=True)
class Host:
    """One emulated machine."""

    name: str  # logical name (a topology node, "head", ...)
    netns: str  # its network namespace
    address: str  # its IPv4 address on the test subnet
    port: str  # its veth end in the bridge namespace (down = partition)


class NetnsHosts:
    """N hosts on one machine, each in its own network namespace; a context manager.

    Args:
        names: logical host names, unique, letters/digits/``_.-``.
        subnet: the private test subnet; hosts take its first addresses in order.
        prefix: common prefix of every namespace created.
    """

    def __init__(self, names: Sequence[str], *, subnet: str = SUBNET, prefix: str = PREFIX) -> None:
        net = ipaddress.ip_network(subnet)
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"names = {list(names)!r}: need at least one host, names unique")
        if len(names) > net.num_addresses - 2:
            raise ValueError(f"names: {len(names)} hosts do not fit in subnet = {subnet!r}")
        base = f"{prefix}{os.getpid()}-{next(_sequence)}"
        self.prefix = base  # every namespace of this instance starts with it
        self.prefix_len = net.prefixlen  # netmask bits of the subnet
        self.bridge_netns = f"{base}-br"  # namespace holding the bridge
        addresses = itertools.islice(net.hosts(), len(names))
        self.hosts: dict[str, Host] = {
            name: Host(name, f"{base}-h-{name}", str(addr), f"p{i}")
            for i, (name, addr) in enumerate(zip(names, addresses))}
        self._procs: list[subprocess.Popen] = []
        self._rates: dict[str, dict[str | None, float]] = {}  # host -> {peer address or None: Mbit/s}
        self._created: list[str] = []

    # ----- lifecycle -----

    def start(self) -> NetnsHosts:
        """Create the namespaces, the bridge and one veth pair per host; tear down on failure."""
        atexit.register(self.teardown)
        try:
            self._add_netns(self.bridge_netns)
            _ip("-n", self.bridge_netns, "link", "add", BRIDGE, "type", "bridge")
            _ip("-n", self.bridge_netns, "link", "set", BRIDGE, "up")
            for host in self.hosts.values():
                self._add_netns(host.netns)
                _ip("-n", host.netns, "link", "set", "lo", "up")
                _ip("-n", self.bridge_netns, "link", "add", host.port, "type", "veth",
                    "peer", "name", HOST_IF, "netns", host.netns)
                _ip("-n", self.bridge_netns, "link", "set", host.port, "master", BRIDGE)
                _ip("-n", self.bridge_netns, "link", "set", host.port, "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/{self.prefix_len}", "dev", HOST_IF)
                _ip("-n", host.netns, "link", "set", HOST_IF, "up")
        except BaseException:
            self.teardown()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)

    def teardown(self) -> None:
        """Stop every process in our namespaces and delete them. Idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=KILL_GRACE_S)
        self._procs.clear()
        for name in reversed(self._created):
            _kill_and_delete(name)
        self._created.clear()
        atexit.unregister(self.teardown)

    def __enter__(self) -> NetnsHosts:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    # ----- running things -----

    def address(self, name: str) -> str:
        """The IPv4 address of host ``name``."""
        return self._host(name).address

    def _host(self, name: str) -> Host:
        if name not in self.hosts:
            raise ValueError(f"host = {name!r}: no such host; hosts: {', '.join(self.hosts)}")
        return self.hosts[name]

    def command(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside host ``name``'s namespace."""
        return ["ip", "netns", "exec", self._host(name).netns, *argv]

    def run(self, name: str, argv: Sequence[str], *, timeout: float, check: bool = True,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` to completion inside host ``name`` (text output captured)."""
        return subprocess.run(self.command(name, argv), capture_output=True, text=True, timeout=timeout,
                              check=check, env=None if env is None else dict(env))

    def spawn(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              **popen_kwargs: object) -> subprocess.Popen:
        """Start ``argv`` inside host ``name``; it is stopped at teardown at the latest."""
        proc = subprocess.Popen(self.command(name, argv), env=None if env is None else dict(env),
                                **popen_kwargs)  # type: ignore[arg-type]
        self._procs.append(proc)
        return proc

    # ----- the network -----

    def link_down(self, name: str) -> None:
        """Cut host ``name`` off the bridge (a partition: its packets go nowhere)."""
        _ip("-n", self.bridge_netns, "link", "set", self._host(name).port, "down")

    def link_up(self, name: str) -> None:
        """Reconnect host ``name`` to the bridge."""
        _ip("-n", self.bridge_netns, "link", "set", self._host(name).port, "up")

    def shape(self, name: str, rate_mbps: float, *, peer: str | None = None) -> None:
        """Limit host ``name``'s egress to ``rate_mbps`` (all of it, or only what goes to ``peer``).

        The whole egress uses ``tc tbf``; per-peer limits an ``htb`` tree with one class per peer
        (u32 match on the destination address). Calls accumulate; :meth:`unshape` clears them.
        """
        if isinstance(rate_mbps, bool) or not isinstance(rate_mbps, (int, float)) or not rate_mbps > 0 \
                or not math.isfinite(rate_mbps):
            raise ValueError(f"rate_mbps = {rate_mbps!r}: must be a finite number > 0")
        key = None if peer is None else self.address(peer)
        self._rates.setdefault(self._host(name).name, {})[key] = float(rate_mbps)
        self._apply_rates(name)

    def unshape(self, name: str) -> None:
        """Remove every limit on host ``name``'s egress."""
        self._rates.pop(self._host(name).name, None)
        _tc(self._host(name).netns, "qdisc", "del", "dev", HOST_IF, "root", check=False)

    def shape_links(self, topology: Topology, hosts: Mapping[str, str] | None = None) -> None:
        """Shape every pair of hosts with the bandwidth the topology gives its link, each direction.

        Args:
            topology: its node names are mapped to hosts by ``hosts`` (default: same names).
            hosts: node name -> host name, for the nodes that run on one of these hosts.
        """
        mapping = dict(hosts) if hosts is not None else {n.name: n.name for n in topology.nodes
                                                         if n.name in self.hosts}
        for src, src_host in mapping.items():
            for dst, dst_host in mapping.items():
                bandwidth = topology.link(src, dst).bandwidth_mbps
                if src_host != dst_host and math.isfinite(bandwidth):
                    self.shape(src_host, bandwidth, peer=dst_host)

    def _apply_rates(self, name: str) -> None:
        host = self._host(name)
        rates = self._rates.get(host.name, {})
        _tc(host.netns, "qdisc", "del", "dev", HOST_IF, "root", check=False)
        if set(rates) == {None}:
            _tc(host.netns, "qdisc", "add", "dev", HOST_IF, "root", "tbf", *_bucket(rates[None]),
                "latency", f"{TBF_QUEUE_LATENCY_MS}ms")
            return
        default_kbit = _kbit(rates[None]) if None in rates else UNSHAPED_KBIT
        _tc(host.netns, "qdisc", "add", "dev", HOST_IF, "root", "handle", "1:", "htb", "default", "1")
        _tc(host.netns, "class", "add", "dev", HOST_IF, "parent", "1:", "classid", "1:1", "htb",
            "rate", f"{default_kbit}kbit", "quantum", str(HTB_QUANTUM))
        peers = [(addr, mbps) for addr, mbps in rates.items() if addr is not None]
        for minor, (addr, mbps) in enumerate(peers, start=2):
            _tc(host.netns, "class", "add", "dev", HOST_IF, "parent", "1:", "classid", f"1:{minor}", "htb",
                *_bucket(mbps), "quantum", str(HTB_QUANTUM))
            _tc(host.netns, "filter", "add", "dev", HOST_IF, "parent", "1:", "protocol", "ip", "prio", "1",
                "u32", "match", "ip", "dst", f"{addr}/32", "flowid", f"1:{minor}")


def _kbit(rate_mbps: float) -> int:
    return max(1, round(rate_mbps * KBIT_PER_MBIT))


def _bucket(rate_mbps: float) -> list[str]:
    """``rate R burst B`` arguments of tbf/htb for ``rate_mbps``."""
    burst = max(MIN_BURST_BYTES, round(rate_mbps * BITS_PER_MEGABIT / BITS_PER_BYTE * BURST_WINDOW_S))
    return ["rate", f"{_kbit(rate_mbps)}kbit", "burst", f"{burst}b"]
