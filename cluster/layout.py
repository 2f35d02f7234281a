"""The Topology model: nodes, links, models, the stage layout, and the questions asked of them.

Frozen dataclasses, validated on construction whatever built them (the file parser in
:mod:`specmesh.cluster.topology`, :func:`~specmesh.cluster.topology.single_machine`, a test). Errors
name the key of the topology file a field comes from (:mod:`specmesh.cluster.keypath`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable

from specmesh.runtime.config import WEIGHT_FORMATS

from .cores import cpu_list, parse_cores, usable_cores
from .keypath import fail
from .links import EMULATE_AUTO, EMULATE_MODES, IDEAL, LinkSpec

ROLE_DEVICE = "device"  # runs the draft worker; the machine nearest the user
ROLE_EDGE = "edge"  # runs target stages
ROLE_DRIVER = "driver"  # runs the driver (scheduler) when that is not the device
ROLE_CLIENT = "client"  # submits jobs only
ROLES = (ROLE_DEVICE, ROLE_EDGE, ROLE_DRIVER, ROLE_CLIENT)
STAGE_ROLES = (ROLE_DEVICE, ROLE_EDGE)  # roles that may host a target stage

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # node names end up in Ray resource names


def _check_name(key: str, value: object) -> None:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise fail(key, value, f"must be a non-empty name matching {NAME_PATTERN.pattern}")


@dataclass(frozen=True)
class Node:
    """A machine (or, on one machine, a logical host) that runs SpecMesh workers."""

    name: str  # unique, used in links, stages and error messages
    role: str  # one of ROLES
    address: str | None = None  # IP or host name on a real network; None = anywhere / this machine
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources that pin it
    # CPU cores the node owns, ascending (a list or a cpu-list string such as "0-1" is normalised);
    # None = not pinned, the actors share whatever cores the OS gives them.
    cores: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_name("name", self.name)
        if self.role not in ROLES:
            raise fail("role", self.role, f"must be one of {', '.join(ROLES)}")
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()
                                         or any(c.isspace() for c in self.address)):
            raise fail("address", self.address, "must be a non-empty IP or host name without spaces")
        if not isinstance(self.resources, dict):
            raise TypeError(f"resources = {self.resources!r}: must be a table of name = amount")
        for res, amount in self.resources.items():
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) \
                    or not math.isfinite(amount) or amount < 0:
                raise fail(f"resources.{res}", amount, "must be a finite number >= 0")
        if self.cores is not None:
            object.__setattr__(self, "cores", parse_cores(self.cores))


@dataclass(frozen=True)
class Link:
    """A link between two distinct nodes, one spec per direction."""

    a: str  # one end (a node name)
    b: str  # the other end, != a
    up: LinkSpec = IDEAL  # direction a -> b
    down: LinkSpec = IDEAL  # direction b -> a


@dataclass(frozen=True)
class Models:
    """The draft and target models, as the user named them (resolved by ``specmesh.actors``)."""

    target: str  # bundled name, local dir, HF id or a tiny spec ("tiny:layers=4"; see actors.tiny)
    draft: str | None = None  # same forms; None = target-only baseline (no speculation)
    weights: str | None = None  # the stages' weight format (SpecConfig.weights); None = the config's
    draft_weights: str | None = None  # the draft's (SpecConfig.draft_weights); None = the config's

    def __post_init__(self) -> None:
        for key in ("weights", "draft_weights"):
            value = getattr(self, key)
            if value is not None and value not in WEIGHT_FORMATS:
                raise fail(key, value, f"must be one of {', '.join(WEIGHT_FORMATS)}")
        if not isinstance(self.target, str) or not self.target.strip():
            raise fail("target", self.target, "must name the target model (bundled name, dir, HF id, tiny:...)")
        if self.draft is not None and (not isinstance(self.draft, str) or not self.draft.strip()):
            raise fail("draft", self.draft, "must name the draft model, or be left out for target-only")


@dataclass(frozen=True)
class Topology:
    """Nodes, links, models and the stage layout of one SpecMesh deployment.

    Field errors name the key of the topology file they come from.
    """

    nodes: tuple[Node, ...]  # every node; exactly one has role "device"
    links: tuple[Link, ...]  # listed links; each unordered pair at most once
    models: Models  # draft and target
    stages: tuple[str, ...]  # host node of each target stage, in pipeline order
    layers: tuple[int, ...] | None = None  # explicit layer count per stage; None = even split
    default_link: LinkSpec = IDEAL  # link between distinct nodes not listed in ``links``
    emulate: str = EMULATE_AUTO  # how much of the links the application emulates (links.EMULATE_MODES)
    name: str = ""  # free-form description, shown with reported figures
    policies: dict = field(default_factory=dict)  # the [policies] table: SpecConfig fields and policy knobs

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "links", tuple(self.links))
        object.__setattr__(self, "stages", tuple(self.stages))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        by_name: dict[str, Node] = {}
        for i, node in enumerate(self.nodes):
            if node.name in by_name:
                raise fail(f"nodes[{i}].name", node.name, "duplicate node name; names must be unique")
            by_name[node.name] = node
        devices = [n.name for n in self.nodes if n.role == ROLE_DEVICE]
        if len(devices) != 1:
            raise fail("nodes", devices, f"need exactly one node with role = {ROLE_DEVICE!r}")
        self._check_stages(by_name)
        self._check_links(by_name)
        if self.emulate not in EMULATE_MODES:
            raise fail("link_model.emulate", self.emulate, f"must be one of {', '.join(EMULATE_MODES)}")

    def _check_stages(self, by_name: dict[str, Node]) -> None:
        if not self.stages:
            raise fail("stages", list(self.stages), "need at least one stage (a list of node names)")
        for i, host in enumerate(self.stages):
            if host not in by_name:
                raise fail(f"stages[{i}]", host, f"no such node; nodes: {', '.join(by_name)}")
            if by_name[host].role not in STAGE_ROLES:
                raise fail(f"stages[{i}]", host, f"node has role {by_name[host].role!r}; "
                           f"stages run on roles {', '.join(STAGE_ROLES)}")
        if self.layers is None:
            return
        if len(self.layers) != len(self.stages):
            raise fail("layers", list(self.layers), f"need one count per stage ({len(self.stages)})")
        for i, count in enumerate(self.layers):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise fail(f"layers[{i}]", count, "must be an integer >= 1")

    def _check_links(self, by_name: dict[str, Node]) -> None:
        seen: set[frozenset[str]] = set()
        for i, link in enumerate(self.links):
            for end in ("a", "b"):
                if getattr(link, end) not in by_name:
                    raise fail(f"links[{i}].{end}", getattr(link, end),
                               f"no such node; nodes: {', '.join(by_name)}")
            if link.a == link.b:
                raise fail(f"links[{i}].b", link.b, "must differ from a (a node's link to itself is ideal)")
            pair = frozenset((link.a, link.b))
            if pair in seen:
                raise fail(f"links[{i}]", f"{link.a} <-> {link.b}", "pair already listed; list each pair once")
            seen.add(pair)

    # ----- lookups -----

    def node(self, name: str) -> Node:
        """The node called ``name``; ValueError when there is none."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise fail("node", name, f"no such node; nodes: {', '.join(n.name for n in self.nodes)}")

    @property
    def device(self) -> Node:
        """The node that runs the draft worker."""
        return next(n for n in self.nodes if n.role == ROLE_DEVICE)

    @property
    def num_stages(self) -> int:
        """Number of target pipeline stages."""
        return len(self.stages)

    def link(self, src: str, dst: str) -> LinkSpec:
        """The link a message crosses from node ``src`` to node ``dst`` (direction-aware).

        Same node: ideal. A listed pair: its ``up`` spec from a to b, ``down`` from b to a. Otherwise
        the default link.
        """
        self.node(src)  # unknown names fail here, naming the node
        self.node(dst)
        if src == dst:
            return IDEAL
        for link in self.links:
            if (link.a, link.b) == (src, dst):
                return link.up
            if (link.b, link.a) == (src, dst):
                return link.down
        return self.default_link

    def round_hops(self) -> list[tuple[str, str]]:
        """(src, dst) nodes of each message of a round: device -> stage 0 -> ... -> last -> device."""
        path = [self.device.name, *self.stages, self.device.name]
        return list(zip(path[:-1], path[1:]))

    def describe_links(self) -> str:
        """One line naming the links of a round, for reports: ``device->edge1 20ms/10Mbps, ...``."""
        def fmt(spec: LinkSpec) -> str:
            bw = "inf" if math.isinf(spec.bandwidth_mbps) else f"{spec.bandwidth_mbps:g}Mbps"
            return f"{spec.latency_ms:g}ms/{bw}"
        hops = ", ".join(f"{s}->{d} {fmt(self.link(s, d))}" for s, d in self.round_hops())
        return f"{hops} (emulate={self.emulate})"

    # ----- compute: the cores each node owns -----

    def cores_for(self, node_name: str) -> tuple[int, ...] | None:
        """The CPU cores node ``node_name`` owns (ascending), None when it names none."""
        return self.node(node_name).cores

    def threads_for(self, node_name: str) -> int | None:
        """Torch threads an actor on ``node_name`` runs: one per owned core; None when not pinned."""
        cores = self.cores_for(node_name)
        return None if cores is None else len(cores)

    def actor_nodes(self) -> list[str]:
        """Names of the nodes that host an actor (the device's draft, the stages), in file order."""
        hosts = {self.device.name, *self.stages}
        return [n.name for n in self.nodes if n.name in hosts]

    def device_cores_disjoint(self) -> bool:
        """True when the device and every stage host name their cores and the device shares none of
        them: the draft then computes while the stages verify, as on separate machines (so overlap is
        on exactly then). False when any of them is unpinned, or a stage runs on the device's cores."""
        device = self.device.cores
        if device is None:
            return False
        for host in self.stages:
            cores = self.node(host).cores
            if cores is None or set(cores) & set(device):
                return False
        return True

    def check_machine_cores(self, available: Iterable[int] | None = None) -> None:
        """Check that this machine has every core the nodes name (call where the layout is used).

        Args:
            available: the usable core ids; None = this process's (:func:`cores.usable_cores`).

        Raises:
            ValueError: ``nodes[i].cores = [...]: core(s) ... not on this machine (usable: ...)``.
        """
        have = frozenset(usable_cores() if available is None else available)
        for i, node in enumerate(self.nodes):
            missing = sorted(set(node.cores or ()) - have)
            if missing:
                raise fail(f"nodes[{i}].cores", list(node.cores or ()),
                           f"core(s) {cpu_list(missing)} of node {node.name!r} not on this machine "
                           f"(usable cores: {cpu_list(have) or 'none'}); name cores it has, or leave "
                           "cores out")

    # ----- layers -----

    def validate_layers(self, num_layers: int) -> None:
        """Check the stage layout against the target's layer count; ValueError naming the key if not."""
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise fail("num_layers", num_layers, "must be an integer >= 1")
        if self.layers is None:
            if self.num_stages > num_layers:
                raise fail("stages", list(self.stages), f"{self.num_stages} stages but the target has "
                           f"{num_layers} layers; at most {num_layers} stages")
        elif sum(self.layers) != num_layers:
            raise fail("layers", list(self.layers), f"sum to {sum(self.layers)} but the target has "
                       f"{num_layers} layers; the counts must sum to {num_layers}")

    def split_layers(self, num_layers: int) -> list[range]:
        """The decoder layers of each stage, contiguous and in order, covering ``range(num_layers)``."""
        self.validate_layers(num_layers)
        if self.layers is None:
            base, extra = divmod(num_layers, self.num_stages)
            counts = [base + (1 if i < extra else 0) for i in range(self.num_stages)]
        else:
            counts = list(self.layers)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [range(start, start + count) for start, count in zip(starts, counts)]


def check_threads(topology: Topology, threads: int | None) -> None:
    """Refuse a layout that gives an actor more torch threads than its node owns cores.

    Args:
        topology: the layout; only nodes that host an actor and name their cores are checked.
        threads: torch threads per actor (``SpecConfig.threads``); None = one per owned core.

    Raises:
        ValueError: ``threads = 2: node 'edge1' owns 1 core(s) (nodes[1].cores = [1]); ...``.
    """
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise fail("threads", threads, "must be an integer >= 1, or None for one per owned core")
    hosts = set(topology.actor_nodes())
    for i, node in enumerate(topology.nodes):
        if node.name in hosts and node.cores is not None and threads > len(node.cores):
            raise fail("threads", threads, f"node {node.name!r} owns {len(node.cores)} core(s) "
                       f"(nodes[{i}].cores = {list(node.cores)}); an actor there may run at most "
                       f"{len(node.cores)} torch thread(s): lower threads or give the node more cores")
