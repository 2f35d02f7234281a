"""The plan of an emulated cluster: a pure function from a topology to namespaces, addresses, links,
``tc`` rules and ``ray start`` commands. Nothing here runs a command; :mod:`specmesh.cluster.emulate` does.

Every name starts with one prefix (default ``smx-``): the bridge namespace ``<prefix>br`` holds bridge
``br0`` and one veth end per host (``p0``, ``p1``, ...); host ``NAME`` lives in namespace
``<prefix>h-NAME`` with ``lo`` and ``eth0`` (the other end). One host per topology node, plus a client
host (the topology's first ``client`` node, else one named ``client``) that runs no Ray. Egress is
shaped per peer as the topology's links say: ``tbf`` when a host sends at one rate to every peer, else
an ``htb`` class per peer; with ``netem`` the link's latency is added to each peer's class as well.
"""
from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from .links import BITS_PER_BYTE, BITS_PER_MEGABIT, EMULATE_LATENCY, EMULATE_OFF
from .topology import ROLE_CLIENT, ROLE_DEVICE, ROLE_DRIVER, Topology, dump_topology

PREFIX = "smx-"  # every namespace `specmesh emulate` creates starts with it
PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,11}-$")  # short, ends in "-": names stay readable
SUBNET = "10.213.0.0/24"  # private test subnet, used only inside the namespaces
BRIDGE = "br0"  # the bridge, inside the bridge namespace
HOST_IF = "eth0"  # a host's interface, inside its namespace
CLIENT = "client"  # the client host's name when the topology has no client node
GCS_PORT = 6379
DASHBOARD_PORT = 8265  # the job server (`ray job submit --address http://HEAD:8265`)
OBJECT_STORE_MB = 100  # per Ray node; Ray's default (30% of RAM per node) is far too much here
BURST_WINDOW_S = 0.01  # tbf/htb bucket: 10 ms of traffic at the shaped rate ...
MIN_BURST_BYTES = 4096  # ... but at least this
TBF_QUEUE_LATENCY_MS = 400  # how long tbf may queue a packet before dropping it
UNSHAPED_KBIT = 10_000_000  # htb's default class (traffic to no listed peer): 10 Gbit/s, i.e. unshaped
HTB_QUANTUM = 60_000  # bytes per htb round; silences the "quantum is big" warning at high rates
NETEM_LIMIT = 100_000  # packets netem may hold (its default, 1000, drops at high rate x delay)
KBIT_PER_MBIT = 1000
RAY_HEAD, RAY_WORKER, RAY_NONE = "head", "worker", "none"


@dataclass(frozen=True)
class Shape:
    """One rule of a host's egress: traffic to ``peer`` (None: all of it) at ``rate_mbps``, delayed."""

    peer: str | None  # destination address; None = the whole egress
    rate_mbps: float  # Mbit/s; inf = unshaped
    delay_ms: float = 0.0  # netem delay; 0 = none


@dataclass(frozen=True)
class HostPlan:
    """One emulated machine."""

    name: str  # topology node name (or the client's)
    netns: str  # its network namespace
    address: str  # its IPv4 address on the test subnet
    port: str  # its veth end in the bridge namespace (down = partition)
    ray: str  # RAY_HEAD, RAY_WORKER or RAY_NONE
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources
    num_cpus: int = 1  # Ray's CPU count for the node
    cores: tuple[int, ...] | None = None  # CPU cores its processes run on (taskset); None = any
    egress: tuple[Shape, ...] = ()  # tc rules of its eth0


@dataclass(frozen=True)
class EmulatePlan:
    """Every namespace, address, link rule and Ray command of one emulated cluster."""

    prefix: str
    subnet: str
    bridge_netns: str
    hosts: tuple[HostPlan, ...]  # Ray nodes in topology order, then the client
    head: str  # name of the host that runs the Ray head
    client: str  # name of the client host (no Ray)
    netem: bool  # latency from the kernel (netem); False: the application must add it
    object_store_mb: int = OBJECT_STORE_MB

    def host(self, name: str) -> HostPlan:
        """The host called ``name``; ValueError naming the hosts when there is none."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise ValueError(f"node = {name!r}: no such host; hosts: {', '.join(h.name for h in self.hosts)}")

    @property
    def head_address(self) -> str:
        return self.host(self.head).address

    @property
    def gcs_address(self) -> str:
        """``HEAD:6379``: what ``ray start --address`` and drivers on the nodes connect to."""
        return f"{self.head_address}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        """``http://HEAD:8265``: the job server."""
        return f"http://{self.head_address}:{DASHBOARD_PORT}"

    def network_commands(self) -> list[list[str]]:
        """``ip``/``tc`` commands that build the network, in order (each acts inside one namespace)."""
        br = self.bridge_netns
        cmds = [["ip", "netns", "add", br], ["ip", "-n", br, "link", "set", "lo", "up"],
                ["ip", "-n", br, "link", "add", BRIDGE, "type", "bridge"],
                ["ip", "-n", br, "link", "set", BRIDGE, "up"]]
        bits = ipaddress.ip_network(self.subnet).prefixlen
        for h in self.hosts:
            cmds += [["ip", "netns", "add", h.netns], ["ip", "-n", h.netns, "link", "set", "lo", "up"],
                     ["ip", "-n", br, "link", "add", h.port, "type", "veth", "peer", "name", HOST_IF,
                      "netns", h.netns],
                     ["ip", "-n", br, "link", "set", h.port, "master", BRIDGE],
                     ["ip", "-n", br, "link", "set", h.port, "up"],
                     ["ip", "-n", h.netns, "addr", "add", f"{h.address}/{bits}", "dev", HOST_IF],
                     ["ip", "-n", h.netns, "link", "set", HOST_IF, "up"]]
            cmds += shaping_commands(h.netns, h.egress)
        return cmds

    def ray_command(self, name: str, ray_bin: str, temp_dir: str) -> list[str]:
        """The ``ray start --block`` command of host ``name`` (under ``taskset`` when it has cores),
        to run inside its namespace; ValueError for the client, which runs no Ray."""
        h = self.host(name)
        if h.ray == RAY_NONE:
            raise ValueError(f"node = {name!r}: the client host runs no Ray")
        argv = [ray_bin, "start", "--block", f"--node-ip-address={h.address}", f"--num-cpus={h.num_cpus}",
                f"--resources={json.dumps(h.resources, sort_keys=True)}", f"--temp-dir={temp_dir}",
                f"--object-store-memory={self.object_store_mb * 1024 * 1024}", "--disable-usage-stats"]
        if h.ray == RAY_HEAD:
            argv += ["--head", f"--port={GCS_PORT}", "--dashboard-host=0.0.0.0",
                     f"--dashboard-port={DASHBOARD_PORT}"]
        else:
            argv += [f"--address={self.gcs_address}"]
        if h.cores is not None:
            argv = ["taskset", "-c", ",".join(map(str, h.cores)), *argv]
        return argv


def shaping_commands(netns: str, egress: Sequence[Shape]) -> list[list[str]]:
    """``tc`` commands that install ``egress`` on ``eth0`` of ``netns`` (none when it is empty)."""
    if not egress:
        return []
    tc = ["tc", "-n", netns]
    if len(egress) == 1 and egress[0].peer is None and egress[0].delay_ms == 0:
        return [[*tc, "qdisc", "add", "dev", HOST_IF, "root", "tbf", *_bucket(egress[0].rate_mbps),
                 "latency", f"{TBF_QUEUE_LATENCY_MS}ms"]]
    if any(shape.peer is None for shape in egress):
        raise ValueError(f"egress = {list(egress)!r}: a rule for all traffic (peer None) must be the only one "
                         "and carry no delay; give per-peer rules otherwise")
    cmds = [[*tc, "qdisc", "add", "dev", HOST_IF, "root", "handle", "1:", "htb", "default", "1"],
            [*tc, "class", "add", "dev", HOST_IF, "parent", "1:", "classid", "1:1", "htb",
             "rate", f"{UNSHAPED_KBIT}kbit", "quantum", str(HTB_QUANTUM)]]
    for minor, shape in enumerate(egress, start=2):
        cmds.append([*tc, "class", "add", "dev", HOST_IF, "parent", "1:", "classid", f"1:{minor}", "htb",
                     *_bucket(shape.rate_mbps), "quantum", str(HTB_QUANTUM)])
        if shape.delay_ms > 0:
            cmds.append([*tc, "qdisc", "add", "dev", HOST_IF, "parent", f"1:{minor}", "handle", f"{minor}:",
                         "netem", "delay", f"{shape.delay_ms:g}ms", "limit", str(NETEM_LIMIT)])
        cmds.append([*tc, "filter", "add", "dev", HOST_IF, "parent", "1:", "protocol", "ip", "prio", "1",
                     "u32", "match", "ip", "dst", f"{shape.peer}/32", "flowid", f"1:{minor}"])
    return cmds


def _bucket(rate_mbps: float) -> list[str]:
    """``rate R burst B`` of tbf/htb for ``rate_mbps`` (inf: htb's unshaped rate)."""
    if math.isinf(rate_mbps):
        return ["rate", f"{UNSHAPED_KBIT}kbit"]
    burst = max(MIN_BURST_BYTES, round(rate_mbps * BITS_PER_MEGABIT / BITS_PER_BYTE * BURST_WINDOW_S))
    return ["rate", f"{max(1, round(rate_mbps * KBIT_PER_MBIT))}kbit", "burst", f"{burst}b"]


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is a valid name prefix, else ValueError saying what is accepted."""
    if not isinstance(prefix, str) or not PREFIX_PATTERN.match(prefix):
        raise ValueError(f"prefix = {prefix!r}: must match {PREFIX_PATTERN.pattern} (e.g. {PREFIX!r})")
    return prefix


def owned(name: str, prefix: str) -> bool:
    """Whether namespace ``name`` is one an emulation with ``prefix`` creates (bridge or host)."""
    return name == f"{prefix}br" or name.startswith(f"{prefix}h-")


def _addresses(topology: Topology, subnet: str, names: Sequence[str]) -> dict[str, str]:
    """Each host's address: the topology's when it gives one (inside the subnet), else the next free."""
    net = ipaddress.ip_network(subnet)
    fixed: dict[str, str] = {}
    for node in topology.nodes:
        if node.address is None or node.name not in names:
            continue
        try:
            addr = ipaddress.ip_address(node.address)
        except ValueError:
            raise ValueError(f"nodes.{node.name}.address = {node.address!r}: emulated hosts need an IPv4 "
                             f"address in subnet {subnet} (or none)") from None
        if addr not in net or addr in (net.network_address, net.broadcast_address):
            raise ValueError(f"nodes.{node.name}.address = {node.address!r}: not a host address of "
                             f"subnet {subnet}; leave it out or pick one inside")
        if str(addr) in fixed.values():
            raise ValueError(f"nodes.{node.name}.address = {node.address!r}: given to two nodes")
        fixed[node.name] = str(addr)
    free = (str(a) for a in net.hosts() if str(a) not in fixed.values())
    try:
        return {n: fixed[n] if n in fixed else next(free) for n in names}
    except StopIteration:
        raise ValueError(f"subnet = {subnet!r}: {len(names)} hosts do not fit") from None


def _egress(topology: Topology, src: str, peers: dict[str, str], netem: bool) -> tuple[Shape, ...]:
    """The rules of ``src``'s egress to every other Ray node (``peers``: name -> address)."""
    shapes = []
    for dst, addr in peers.items():
        if dst != src:
            link = topology.link(src, dst)
            shapes.append(Shape(addr, link.bandwidth_mbps, link.latency_ms if netem else 0.0))
    rates = {s.rate_mbps for s in shapes}
    if not netem and len(rates) == 1 and math.isfinite(next(iter(rates))):
        return (Shape(None, rates.pop()),)  # one rate to every peer: a plain tbf
    return tuple(s for s in shapes if math.isfinite(s.rate_mbps) or s.delay_ms > 0)


def make_plan(topology: Topology, *, subnet: str = SUBNET, prefix: str = PREFIX, netem: bool = False,
              head: str | None = None, num_cpus: int | None = None, object_store_mb: int = OBJECT_STORE_MB,
              cores_for: Callable[[str], tuple[int, ...] | None] | None = None) -> EmulatePlan:
    """The emulated cluster of ``topology``.

    Args:
        topology: its nodes become hosts (a ``client`` node runs no Ray); links shape the egress.
        subnet: private IPv4 subnet of the hosts' addresses.
        prefix: common prefix of every namespace (see :data:`PREFIX_PATTERN`).
        netem: whether the kernel has netem (then it adds each link's latency too).
        head: host of the Ray head. [default: the ``driver`` node, else the device]
        num_cpus: Ray CPUs per node. [default: the node's core count, else 1]
        object_store_mb: Ray object store per node, MB.
        cores_for: node name -> its CPU cores or None. [default: ``topology.cores_for``]
    """
    check_prefix(prefix)
    cores_for = cores_for or getattr(topology, "cores_for", None)
    net = ipaddress.ip_network(subnet)
    if net.version != 4 or not net.is_private:
        raise ValueError(f"subnet = {subnet!r}: must be a private IPv4 subnet (e.g. {SUBNET})")
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise ValueError(f"num_cpus = {num_cpus!r}: must be an integer >= 1")
    ray_nodes = [n for n in topology.nodes if n.role != ROLE_CLIENT]
    clients = [n.name for n in topology.nodes if n.role == ROLE_CLIENT]
    if not clients and CLIENT in {n.name for n in topology.nodes}:
        raise ValueError(f"nodes.{CLIENT}: a node named {CLIENT!r} must have role {ROLE_CLIENT!r} "
                         "(that name is the client host's)")
    client = clients[0] if clients else CLIENT
    drivers = [n.name for n in ray_nodes if n.role == ROLE_DRIVER]
    head = head or (drivers[0] if drivers else next(n.name for n in ray_nodes if n.role == ROLE_DEVICE))
    if head not in {n.name for n in ray_nodes}:
        raise ValueError(f"head = {head!r}: must be a Ray node; nodes: {', '.join(n.name for n in ray_nodes)}")
    names = [n.name for n in ray_nodes] + [c for c in [client] if c not in clients] + clients
    addresses = _addresses(topology, subnet, names)
    peers = {n.name: addresses[n.name] for n in ray_nodes}
    hosts = []
    for i, name in enumerate(names):
        node = next((n for n in ray_nodes if n.name == name), None)
        cores = tuple(cores_for(name)) if cores_for and node and cores_for(name) is not None else None
        hosts.append(HostPlan(
            name=name, netns=f"{prefix}h-{name}", address=addresses[name], port=f"p{i}",
            ray=RAY_NONE if node is None else (RAY_HEAD if name == head else RAY_WORKER),
            resources=dict(node.resources) if node else {}, cores=cores,
            num_cpus=num_cpus or (len(cores) if cores else 1),
            egress=_egress(topology, name, peers, netem) if node else ()))
    return EmulatePlan(prefix=prefix, subnet=str(net), bridge_netns=f"{prefix}br", hosts=tuple(hosts),
                       head=head, client=client, netem=netem, object_store_mb=object_store_mb)


def job_topology(topology: Topology, plan: EmulatePlan) -> str:
    """The topology file a job on the emulation uses: the hosts' addresses, and the link model told to
    add only what the kernel does not (``latency`` without netem, nothing with it)."""
    nodes = tuple(replace(n, address=plan.host(n.name).address) for n in topology.nodes)
    return dump_topology(replace(topology, nodes=nodes, emulate=EMULATE_OFF if plan.netem else EMULATE_LATENCY))
