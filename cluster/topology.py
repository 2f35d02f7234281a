"""The topology file: which nodes exist, which models run, how the target splits, what links join them.

A topology is written in TOML and parsed into the frozen dataclasses of :mod:`specmesh.cluster.layout`
(re-exported here)::

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
    cores = [0]                               # optional CPU cores it owns: [0, 1] or "0-1"

    [[links]]
    a = "device"
    b = "edge1"
    latency_ms = 20                           # both ways; or up_latency_ms / down_latency_ms
    up_mbps = 10                              # a -> b; or bandwidth_mbps for both ways
    down_mbps = 50                            # b -> a

Every error is a ``ValueError`` (or ``TypeError`` for a value of the wrong type) whose message starts
with the key path in the file (``links[0].latency_ms = -5: ...``) and says what is accepted. The target's
layer count and this machine's cores are not in the file: call :meth:`Topology.validate_layers` once the
model config is known and :meth:`Topology.check_machine_cores` on the machine that runs the layout,
before any actor starts.
"""
from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any

from .keypath import at, fail
from .layout import (
    NAME_PATTERN,
    ROLE_CLIENT,
    ROLE_DEVICE,
    ROLE_DRIVER,
    ROLE_EDGE,
    ROLES,
    STAGE_ROLES,
    Link,
    Models,
    Node,
    Topology,
    check_threads,
)
from .links import EMULATE_AUTO, EMULATE_MODES, EMULATE_OFF, EMULATE_ON, IDEAL, LinkSpec

__all__ = [
    "NAME_PATTERN", "ROLES", "ROLE_CLIENT", "ROLE_DEVICE", "ROLE_DRIVER", "ROLE_EDGE", "STAGE_ROLES",
    "SPLITS", "SPLIT_EVEN", "SPLIT_LAYERS", "Link", "Models", "Node", "Topology", "check_threads",
    "dump_topology", "example_path", "load_topology", "parse_topology", "single_machine",
]

SPLIT_EVEN = "even"  # layers spread by count, the first stages taking one more when uneven
SPLIT_LAYERS = "layers"  # explicit per-stage counts in ``layers``
SPLITS = (SPLIT_EVEN, SPLIT_LAYERS)

TOP_KEYS = ("name", "stages", "split", "layers", "models", "nodes", "links", "default_link", "link_model",
            "policies", "federated")  # federated: read by cluster/federated_plan.py
MODEL_KEYS = ("draft", "target", "weights", "draft_weights")
NODE_KEYS = ("name", "role", "address", "resources", "cores")
DEFAULT_LINK_KEYS = ("latency_ms", "bandwidth_mbps")
LINK_KEYS = ("a", "b", "latency_ms", "up_latency_ms", "down_latency_ms", "bandwidth_mbps", "up_mbps", "down_mbps")
LINK_MODEL_KEYS = ("emulate",)
EXAMPLES_DIR = "examples"  # folder of this package that holds the shipped topology files


# ----- parsing -----

def _check_keys(table: Any, allowed: tuple[str, ...], where: str) -> dict:
    if not isinstance(table, dict):
        raise TypeError(f"{where} = {table!r}: must be a table")
    for key in table:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise fail(f"{prefix}{key}", table[key], f"unknown key; accepted: {', '.join(allowed)}")
    return table


def _number(table: dict, key: str, default: float, *, bandwidth: bool) -> float:
    """A latency (finite, >= 0) or bandwidth (> 0, inf allowed) from ``table``, else ``default``."""
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise fail(key, value, "must be a number")
    if bandwidth and value <= 0:
        raise fail(key, value, "must be > 0 Mbit/s (inf = unlimited)")
    if not bandwidth and (value < 0 or not math.isfinite(value)):
        raise fail(key, value, "must be a finite number of milliseconds >= 0")
    return float(value)


def _parse_link(raw: dict, default: LinkSpec) -> Link:
    for end in ("a", "b"):
        if end not in raw:
            raise fail(end, None, "missing; name the nodes at both ends of the link")
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
            raise fail(key, None, f"missing; every node needs a name and a role ({', '.join(ROLES)})")
    return Node(name=raw["name"], role=raw["role"], address=raw.get("address"),
                resources=raw.get("resources", {}), cores=raw.get("cores"))


def _parse_stages(doc: dict, nodes: list[Node]) -> tuple[list[str], list[int] | None]:
    stages = doc.get("stages")
    if stages is None:  # default: one stage per edge node, in file order
        stages = [n.name for n in nodes if n.role == ROLE_EDGE]
        if not stages:
            raise fail("stages", None, "missing, and there is no edge node to default to")
    if not isinstance(stages, list):
        raise fail("stages", stages, "must be a list of node names")
    layers = doc.get("layers")
    split = doc.get("split", SPLIT_LAYERS if layers is not None else SPLIT_EVEN)
    if split not in SPLITS:
        raise fail("split", split, f"must be one of {', '.join(SPLITS)}")
    if split == SPLIT_LAYERS and layers is None:
        raise fail("layers", None, f"missing; split = {SPLIT_LAYERS!r} needs one layer count per stage")
    if split == SPLIT_EVEN and layers is not None:
        raise fail("layers", layers, f"given with split = {SPLIT_EVEN!r}; keep one of the two")
    if layers is not None and not isinstance(layers, list):
        raise fail("layers", layers, "must be a list of layer counts, one per stage")
    return stages, layers


def _emulate_mode(doc: dict) -> str:
    table = _check_keys(doc.get("link_model", {}), LINK_MODEL_KEYS, "link_model")
    mode = table.get("emulate", EMULATE_AUTO)
    if isinstance(mode, bool):
        return EMULATE_ON if mode else EMULATE_OFF
    if mode not in EMULATE_MODES:
        raise fail("link_model.emulate", mode, f"must be one of {', '.join(EMULATE_MODES)} (or true/false)")
    return mode


def parse_topology(doc: dict) -> Topology:
    """Build a :class:`Topology` from a parsed TOML document (a dict)."""
    _check_keys(doc, TOP_KEYS, "")
    models_raw = _check_keys(doc.get("models", {}), MODEL_KEYS, "models")
    with at("models"):
        if "target" not in models_raw:
            raise fail("target", None, "missing; name the target model")
        models = Models(target=models_raw["target"], draft=models_raw.get("draft"),
                        weights=models_raw.get("weights"), draft_weights=models_raw.get("draft_weights"))
    nodes_raw = doc.get("nodes")
    if not isinstance(nodes_raw, list) or not nodes_raw:
        raise fail("nodes", nodes_raw, "need a [[nodes]] table per node, one with role = 'device'")
    nodes = []
    for i, raw in enumerate(nodes_raw):
        _check_keys(raw, NODE_KEYS, f"nodes[{i}]")
        with at(f"nodes[{i}]"):
            nodes.append(_parse_node(raw))
    raw_default = _check_keys(doc.get("default_link", {}), DEFAULT_LINK_KEYS, "default_link")
    with at("default_link"):
        default = LinkSpec(_number(raw_default, "latency_ms", IDEAL.latency_ms, bandwidth=False),
                           _number(raw_default, "bandwidth_mbps", IDEAL.bandwidth_mbps, bandwidth=True))
    links_raw = doc.get("links", [])
    if not isinstance(links_raw, list):
        raise fail("links", links_raw, "must be [[links]] tables")
    links = []
    for i, raw in enumerate(links_raw):
        _check_keys(raw, LINK_KEYS, f"links[{i}]")
        with at(f"links[{i}]"):
            links.append(_parse_link(raw, default))
    stages, layers = _parse_stages(doc, nodes)
    name = doc.get("name", "")
    if not isinstance(name, str):
        raise fail("name", name, "must be a string")
    return Topology(nodes=tuple(nodes), links=tuple(links), models=models, stages=tuple(stages),
                    layers=None if layers is None else tuple(layers), default_link=default,
                    emulate=_emulate_mode(doc), name=name, policies=_parse_policies(doc))


def _parse_policies(doc: dict) -> dict:
    """The ``[policies]`` table: policy choices and knobs (``acceptance = "importance"``,
    ``importance_strength = 0.5``, ...), checked by the policies when a config is built from it."""
    table = doc.get("policies", {})
    if not isinstance(table, dict):
        raise fail("policies", table, "must be a table of name = value")
    for key, value in table.items():
        if not isinstance(value, (str, int, float, bool)):
            raise fail(f"policies.{key}", value, "must be a string, number or bool")
    return dict(table)


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


# ----- writing -----

def _toml(value: Any) -> str:
    """A TOML value: JSON's string escapes are valid TOML basic strings; inf is TOML's ``inf``."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def dump_topology(topology: Topology) -> str:
    """The topology file of ``topology``: ``load_topology(dump_topology(t)) == t``.

    Used where a layout built in code must reach workers as a file (``SpecConfig.topology``).
    """
    t = topology
    lines = [f"name = {_toml(t.name)}", f"stages = {_toml(list(t.stages))}"]
    if t.layers is not None:
        lines.append(f"layers = {_toml(list(t.layers))}")
    else:
        lines.append(f"split = {_toml(SPLIT_EVEN)}")
    lines += ["", "[models]", f"target = {_toml(t.models.target)}"]
    if t.models.draft is not None:
        lines.append(f"draft = {_toml(t.models.draft)}")
    for key in ("weights", "draft_weights"):
        if getattr(t.models, key) is not None:
            lines.append(f"{key} = {_toml(getattr(t.models, key))}")
    if t.policies:
        lines += ["", "[policies]", *(f"{k} = {_toml(v)}" for k, v in t.policies.items())]
    lines += ["", "[link_model]", f"emulate = {_toml(t.emulate)}",
              "", "[default_link]", f"latency_ms = {_toml(float(t.default_link.latency_ms))}",
              f"bandwidth_mbps = {_toml(float(t.default_link.bandwidth_mbps))}"]
    for node in t.nodes:
        lines += ["", "[[nodes]]", f"name = {_toml(node.name)}", f"role = {_toml(node.role)}"]
        if node.address is not None:
            lines.append(f"address = {_toml(node.address)}")
        if node.resources:
            lines.append(f"resources = {_toml(node.resources)}")
        if node.cores is not None:
            lines.append(f"cores = {_toml(list(node.cores))}")
    for link in t.links:
        lines += ["", "[[links]]", f"a = {_toml(link.a)}", f"b = {_toml(link.b)}"]
        for way, spec in (("up", link.up), ("down", link.down)):
            lines += [f"{way}_latency_ms = {_toml(float(spec.latency_ms))}",
                      f"{way}_mbps = {_toml(float(spec.bandwidth_mbps))}"]
    return "\n".join(lines) + "\n"


# ----- shipped and built-in layouts -----

def example_path(name: str) -> Path:
    """Path of a topology file shipped with SpecMesh (``one_machine``, ``three_nodes``, ``tiny``)."""
    path = Path(__file__).parent / EXAMPLES_DIR / f"{name}.toml"
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.toml"))
        raise fail("example", name, f"no such example; shipped: {', '.join(shipped)}")
    return path


def single_machine(num_stages: int, latency_ms: float, bandwidth_mbps: float,
                   draft: str | None, target: str) -> Topology:
    """A topology for one machine without a file: ``device`` plus ``edge1..edgeN``, one stage each,
    every pair of distinct nodes joined by the same modelled link (emulated: ``emulate = "auto"``).
    No node names cores: the workers share this machine's (see the shipped ``one_machine`` for a
    pinned layout)."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise fail("num_stages", num_stages, "must be an integer >= 1")
    edges = [f"edge{i + 1}" for i in range(num_stages)]
    nodes = (Node("device", ROLE_DEVICE), *(Node(e, ROLE_EDGE) for e in edges))
    return Topology(nodes=nodes, links=(), models=Models(target=target, draft=draft), stages=tuple(edges),
                    default_link=LinkSpec(latency_ms, bandwidth_mbps),
                    name=f"one machine, {num_stages} stage(s)")
