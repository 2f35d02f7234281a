"""The topology file: which nodes exist, which models run, how the target splits, what links join them.

A topology is written in TOML and parsed into frozen dataclasses::

    name = "two stages on one machine"       # optional
    stages = ["edge1", "edge2"]               # one entry per target stage; a node may repeat
    split = "even"                            # or: layers = [14, 14]  (one count per stage)

    [models]
    draft = "qwen2.5-coder-0.5b"              # optional: absent = target-only baseline
    target = "qwen2.5-coder-1.5b"             # bundled name, local dir, HF id or "tiny[:k=v,...]"

    [link_model]
    emulate = "auto"                          # auto | on | off | latency (see links.emulated)

    [default_link]                            # pairs of distinct nodes not listed in [[links]]
    latency_ms = 20
    bandwidth_mbps = 100

    [[nodes]]
    name = "device"
    role = "device"                           # device | edge | driver | client
    address = "10.213.0.2"                    # optional
    resources = { specmesh_device = 1 }       # optional Ray custom resources

    [[links]]
    a = "device"
    b = "edge1"
    latency_ms = 20                           # both ways; or up_latency_ms / down_latency_ms
    up_mbps = 10                              # a -> b; or bandwidth_mbps for both ways
    down_mbps = 50                            # b -> a

Every error is a ``ValueError`` (or ``TypeError`` for a value of the wrong type) whose message starts
with the key path in the file (``links[0].latency_ms = -5: ...``) and says what is accepted. The target's
layer count is not in the file: call :meth:`Topology.validate_layers` once the model config is known,
before any actor starts.
"""
from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .links import EMULATE_AUTO, EMULATE_MODES, EMULATE_OFF, EMULATE_ON, IDEAL, LinkSpec

ROLE_DEVICE = "device"  # runs the draft worker; the machine nearest the user
ROLE_EDGE = "edge"  # runs target stages
ROLE_DRIVER = "driver"  # runs the driver (scheduler) when that is not the device
ROLE_CLIENT = "client"  # submits jobs only
ROLES = (ROLE_DEVICE, ROLE_EDGE, ROLE_DRIVER, ROLE_CLIENT)
STAGE_ROLES = (ROLE_DEVICE, ROLE_EDGE)  # roles that may host a target stage

SPLIT_EVEN = "even"  # layers spread by count, the first stages taking one more when uneven
SPLIT_LAYERS = "layers"  # explicit per-stage counts in ``layers``
SPLITS = (SPLIT_EVEN, SPLIT_LAYERS)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # node names end up in Ray resource names

TOP_KEYS = ("name", "stages", "split", "layers", "models", "nodes", "links", "default_link", "link_model")
MODEL_KEYS = ("draft", "target")
NODE_KEYS = ("name", "role", "address", "resources")
DEFAULT_LINK_KEYS = ("latency_ms", "bandwidth_mbps")
LINK_KEYS = ("a", "b", "latency_ms", "up_latency_ms", "down_latency_ms", "bandwidth_mbps", "up_mbps", "down_mbps")
LINK_MODEL_KEYS = ("emulate",)
EXAMPLES_DIR = "examples"  # folder of this package that holds the shipped topology files


def _fail(key: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"{key} = {value!r}: {accepted}")


@contextmanager
def _at(prefix: str) -> Iterator[None]:
    """Prefix the key path of a nested error with ``prefix`` (``nodes[1]`` + ``.role = ...``)."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{prefix}.{exc}") from None


def _check_name(key: str, value: Any) -> None:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise _fail(key, value, f"must be a non-empty name matching {NAME_PATTERN.pattern}")


@dataclass(frozen=True)
class Node:
    """A machine (or, on one machine, a logical host) that runs SpecMesh workers."""

    name: str  # unique, used in links, stages and error messages
    role: str  # one of ROLES
    address: str | None = None  # IP or host name on a real network; None = anywhere / this machine
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources that pin it

    def __post_init__(self) -> None:
        _check_name("name", self.name)
        if self.role not in ROLES:
            raise _fail("role", self.role, f"must be one of {', '.join(ROLES)}")
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()
                                         or any(c.isspace() for c in self.address)):
            raise _fail("address", self.address, "must be a non-empty IP or host name without spaces")
        if not isinstance(self.resources, dict):
            raise TypeError(f"resources = {self.resources!r}: must be a table of name = amount")
        for res, amount in self.resources.items():
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) \
                    or not math.isfinite(amount) or amount < 0:
                raise _fail(f"resources.{res}", amount, "must be a finite number >= 0")


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

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target.strip():
            raise _fail("target", self.target, "must name the target model (bundled name, dir, HF id, tiny:...)")
        if self.draft is not None and (not isinstance(self.draft, str) or not self.draft.strip()):
            raise _fail("draft", self.draft, "must name the draft model, or be left out for target-only")


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "links", tuple(self.links))
        object.__setattr__(self, "stages", tuple(self.stages))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        by_name: dict[str, Node] = {}
        for i, node in enumerate(self.nodes):
            if node.name in by_name:
                raise _fail(f"nodes[{i}].name", node.name, "duplicate node name; names must be unique")
            by_name[node.name] = node
        devices = [n.name for n in self.nodes if n.role == ROLE_DEVICE]
        if len(devices) != 1:
            raise _fail("nodes", devices, f"need exactly one node with role = {ROLE_DEVICE!r}")
        self._check_stages(by_name)
        self._check_links(by_name)
        if self.emulate not in EMULATE_MODES:
            raise _fail("link_model.emulate", self.emulate, f"must be one of {', '.join(EMULATE_MODES)}")

    def _check_stages(self, by_name: dict[str, Node]) -> None:
        if not self.stages:
            raise _fail("stages", list(self.stages), "need at least one stage (a list of node names)")
        for i, host in enumerate(self.stages):
            if host not in by_name:
                raise _fail(f"stages[{i}]", host, f"no such node; nodes: {', '.join(by_name)}")
            if by_name[host].role not in STAGE_ROLES:
                raise _fail(f"stages[{i}]", host, f"node has role {by_name[host].role!r}; "
                            f"stages run on roles {', '.join(STAGE_ROLES)}")
        if self.layers is None:
            return
        if len(self.layers) != len(self.stages):
            raise _fail("layers", list(self.layers), f"need one count per stage ({len(self.stages)})")
        for i, count in enumerate(self.layers):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise _fail(f"layers[{i}]", count, "must be an integer >= 1")

    def _check_links(self, by_name: dict[str, Node]) -> None:
        seen: set[frozenset[str]] = set()
        for i, link in enumerate(self.links):
            for end in ("a", "b"):
                if getattr(link, end) not in by_name:
                    raise _fail(f"links[{i}].{end}", getattr(link, end),
                                f"no such node; nodes: {', '.join(by_name)}")
            if link.a == link.b:
                raise _fail(f"links[{i}].b", link.b, "must differ from a (a node's link to itself is ideal)")
            pair = frozenset((link.a, link.b))
            if pair in seen:
                raise _fail(f"links[{i}]", f"{link.a} <-> {link.b}", "pair already listed; list each pair once")
            seen.add(pair)

    # ----- lookups -----

    def node(self, name: str) -> Node:
        """The node called ``name``; ValueError when there is none."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise _fail("node", name, f"no such node; nodes: {', '.join(n.name for n in self.nodes)}")

    @property
    def device(self) -> Node:
        """The node that runs the draft worker."""
        return next(n for n in self.nodes if n.role == ROLE_DEVICE)

    @property
    def num_stages(self) -> int:
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

    # ----- layers -----

    def validate_layers(self, num_layers: int) -> None:
        """Check the stage layout against the target's layer count; ValueError naming the key if not."""
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise _fail("num_layers", num_layers, "must be an integer >= 1")
        if self.layers is None:
            if self.num_stages > num_layers:
                raise _fail("stages", list(self.stages), f"{self.num_stages} stages but the target has "
                            f"{num_layers} layers; at most {num_layers} stages")
        elif sum(self.layers) != num_layers:
            raise _fail("layers", list(self.layers), f"sum to {sum(self.layers)} but the target has "
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

    def describe_links(self) -> str:
        """One line naming the links of a round, for reports: ``device->edge1 20ms/10Mbps, ...``."""
        def fmt(spec: LinkSpec) -> str:
            bw = "inf" if math.isinf(spec.bandwidth_mbps) else f"{spec.bandwidth_mbps:g}Mbps"
            return f"{spec.latency_ms:g}ms/{bw}"
        hops = ", ".join(f"{s}->{d} {fmt(self.link(s, d))}" for s, d in self.round_hops())
        return f"{hops} (emulate={self.emulate})"


# ----- parsing -----

def _check_keys(table: Any, allowed: tuple[str, ...], where: str) -> dict:
    if not isinstance(table, dict):
        raise TypeError(f"{where} = {table!r}: must be a table")
    for key in table:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise _fail(f"{prefix}{key}", table[key], f"unknown key; accepted: {', '.join(allowed)}")
    return table


def _number(table: dict, key: str, default: float, *, bandwidth: bool) -> float:
    """A latency (finite, >= 0) or bandwidth (> 0, inf allowed) from ``table``, else ``default``."""
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _fail(key, value, "must be a number")
    if bandwidth and value <= 0:
        raise _fail(key, value, "must be > 0 Mbit/s (inf = unlimited)")
    if not bandwidth and (value < 0 or not math.isfinite(value)):
        raise _fail(key, value, "must be a finite number of milliseconds >= 0")
    return float(value)


def _parse_link(raw: dict, default: LinkSpec) -> Link:
    for end in ("a", "b"):
        if end not in raw:
            raise _fail(end, None, "missing; name the nodes at both ends of the link")
    latency = _number(raw, "latency_ms", default.latency_ms, bandwidth=False)
    bandwidth = _number(raw, "bandwidth_mbps", default.bandwidth_mbps, bandwidth=True)
    up = LinkSpec(_number(raw, "up_latency_ms", latency, bandwidth=False),
                  _number(raw, "up_mbps", bandwidth, bandwidth=True))
    down = LinkSpec(_number(raw, "down_latency_ms", latency, bandwidth=False),
                    _number(raw, "down_mbps", bandwidth, bandwidth=True))
    return Link(a=raw["a"], b=raw["b"], up=up, down=down)


def _parse_node(raw: dict) -> Node:
    for key in ("name", "role"):
        if key not in raw:
            raise _fail(key, None, f"missing; every node needs a name and a role ({', '.join(ROLES)})")
    return Node(name=raw["name"], role=raw["role"], address=raw.get("address"),
                resources=raw.get("resources", {}))


def _parse_stages(doc: dict, nodes: list[Node]) -> tuple[list[str], list[int] | None]:
    stages = doc.get("stages")
    if stages is None:  # default: one stage per edge node, in file order
        stages = [n.name for n in nodes if n.role == ROLE_EDGE]
        if not stages:
            raise _fail("stages", None, "missing, and there is no edge node to default to")
    if not isinstance(stages, list):
        raise _fail("stages", stages, "must be a list of node names")
    layers = doc.get("layers")
    split = doc.get("split", SPLIT_LAYERS if layers is not None else SPLIT_EVEN)
    if split not in SPLITS:
        raise _fail("split", split, f"must be one of {', '.join(SPLITS)}")
    if split == SPLIT_LAYERS and layers is None:
        raise _fail("layers", None, f"missing; split = {SPLIT_LAYERS!r} needs one layer count per stage")
    if split == SPLIT_EVEN and layers is not None:
        raise _fail("layers", layers, f"given with split = {SPLIT_EVEN!r}; keep one of the two")
    if layers is not None and not isinstance(layers, list):
        raise _fail("layers", layers, "must be a list of layer counts, one per stage")
    return stages, layers


def _emulate_mode(doc: dict) -> str:
    table = _check_keys(doc.get("link_model", {}), LINK_MODEL_KEYS, "link_model")
    mode = table.get("emulate", EMULATE_AUTO)
    if isinstance(mode, bool):
        return EMULATE_ON if mode else EMULATE_OFF
    if mode not in EMULATE_MODES:
        raise _fail("link_model.emulate", mode, f"must be one of {', '.join(EMULATE_MODES)} (or true/false)")
    return mode


def parse_topology(doc: dict) -> Topology:
    """Build a :class:`Topology` from a parsed TOML document (a dict)."""
    _check_keys(doc, TOP_KEYS, "")
    models_raw = _check_keys(doc.get("models", {}), MODEL_KEYS, "models")
    with _at("models"):
        if "target" not in models_raw:
            raise _fail("target", None, "missing; name the target model")
        models = Models(target=models_raw["target"], draft=models_raw.get("draft"))
    nodes_raw = doc.get("nodes")
    if not isinstance(nodes_raw, list) or not nodes_raw:
        raise _fail("nodes", nodes_raw, "need a [[nodes]] table per node, one with role = 'device'")
    nodes = []
    for i, raw in enumerate(nodes_raw):
        _check_keys(raw, NODE_KEYS, f"nodes[{i}]")
        with _at(f"nodes[{i}]"):
            nodes.append(_parse_node(raw))
    raw_default = _check_keys(doc.get("default_link", {}), DEFAULT_LINK_KEYS, "default_link")
    with _at("default_link"):
        default = LinkSpec(_number(raw_default, "latency_ms", IDEAL.latency_ms, bandwidth=False),
                           _number(raw_default, "bandwidth_mbps", IDEAL.bandwidth_mbps, bandwidth=True))
    links_raw = doc.get("links", [])
    if not isinstance(links_raw, list):
        raise _fail("links", links_raw, "must be [[links]] tables")
    links = []
    for i, raw in enumerate(links_raw):
        _check_keys(raw, LINK_KEYS, f"links[{i}]")
        with _at(f"links[{i}]"):
            links.append(_parse_link(raw, default))
    stages, layers = _parse_stages(doc, nodes)
    name = doc.get("name", "")
    if not isinstance(name, str):
        raise _fail("name", name, "must be a string")
    return Topology(nodes=tuple(nodes), links=tuple(links), models=models, stages=tuple(stages),
                    layers=None if layers is None else tuple(layers), default_link=default,
                    emulate=_emulate_mode(doc), name=name)


def load_topology(source: str | os.PathLike) -> Topology:
    """Load a topology from a file path or from TOML text.

    A ``str`` that contains ``=`` or a newline is TOML text; any other ``str`` or path-like is a path.
    Errors start with the file name (or ``<text>``), then the key path.
    """
    is_text = isinstance(source, str) and ("=" in source or "\n" in source)
    where = "<text>" if is_text else os.fspath(source)
    text = source if is_text else Path(source).read_text(encoding="utf-8")
    try:
        return parse_topology(tomllib.loads(text))
    except (ValueError, TypeError) as exc:  # TOMLDecodeError is a ValueError
        raise type(exc)(f"{where}: {exc}") from None


def example_path(name: str) -> Path:
    """Path of a topology file shipped with SpecMesh (``one_machine``, ``three_nodes``, ``tiny``)."""
    path = Path(__file__).parent / EXAMPLES_DIR / f"{name}.toml"
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.toml"))
        raise _fail("example", name, f"no such example; shipped: {', '.join(shipped)}")
    return path


def single_machine(num_stages: int, latency_ms: float, bandwidth_mbps: float,
                   draft: str | None, target: str) -> Topology:
    """A topology for one machine without a file: ``device`` plus ``edge1..edgeN``, one stage each,
    every pair of distinct nodes joined by the same modelled link (emulated: ``emulate = "auto"``)."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise _fail("num_stages", num_stages, "must be an integer >= 1")
    edges = [f"edge{i + 1}" for i in range(num_stages)]
    nodes = (Node("device", ROLE_DEVICE), *(Node(e, ROLE_EDGE) for e in edges))
    return Topology(nodes=nodes, links=(), models=Models(target=target, draft=draft), stages=tuple(edges),
                    default_link=LinkSpec(latency_ms, bandwidth_mbps),
                    name=f"one machine, {num_stages} stage(s)")
