"""The ``[federated]`` table of a topology file (SpecFed) and each worker's layout::

    [federated]
    top_k = 8                       # entries each worker sends per position (0 = dense)
    strategy = "spread-q"           # zero | spread-uniform | spread-q

    [[federated.workers]]
    target = "tiny:seed=1"          # optional: default [models].target
    stages = ["edge1"]              # the nodes of this worker's stages, in pipeline order
    weight = 2                      # optional: default equal; weights are normalised
    # layers = [2, 2]               # optional, one count per stage; default an even split

    [[federated.workers]]
    target = "tiny:seed=2"
    stages = ["edge2", "edge3"]
    weight = 1

Each worker is a pipeline of its own on its nodes; the device (the draft and the aggregator) sends
every worker the round's proposal and receives every worker's reply over the topology's links. The
top-level ``stages`` is then not used. Errors name the key path (``federated.workers[1].stages``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from pathlib import Path
from typing import Any

from specmesh.policies import federated as fed
from specmesh.runtime.config import SpecConfig

from .keypath import at, fail
from .topology import Topology, load_topology, single_machine

FEDERATED_KEYS = ("top_k", "strategy", "workers")
WORKER_KEYS = ("target", "stages", "layers", "weight")


def _document(source: str | os.PathLike) -> dict:
    """The TOML document at ``source`` (a path, or TOML text as :func:`load_topology` reads it)."""
    is_text = isinstance(source, str) and ("=" in source or "\n" in source)
    text = source if is_text else Path(source).read_text(encoding="utf-8")
    return tomllib.loads(text)


def federated_table(source: str | os.PathLike) -> dict | None:
    """The checked ``[federated]`` table of a topology file, or None when it has none.

    Raises:
        ValueError / TypeError: ``<file>: federated.workers[0].weight = -1: must be ...``.
    """
    where = "<text>" if isinstance(source, str) and ("=" in source or "\n" in source) else os.fspath(source)
    table = _document(source).get("federated")
    if table is None:
        return None
    try:
        return _check_table(table)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{where}: {exc}") from None


def _check_table(table: Any) -> dict:
    if not isinstance(table, dict):
        raise fail("federated", table, "must be a table with top_k, strategy and [[federated.workers]]")
    for key in table:
        if key not in FEDERATED_KEYS:
            raise fail(f"federated.{key}", table[key], f"unknown key; accepted: {', '.join(FEDERATED_KEYS)}")
    workers = table.get("workers")
    if not isinstance(workers, list) or not workers:
        raise fail("federated.workers", workers, "need one [[federated.workers]] table per worker")
    with at("federated"):
        fed.check_top_k(table.get("top_k", fed.DENSE_K))
        fed.check_strategy(table.get("strategy", fed.ZERO))
    for i, worker in enumerate(workers):
        with at(f"federated.workers[{i}]"):
            if not isinstance(worker, dict):
                raise fail("worker", worker, "must be a table")
            for key in worker:
                if key not in WORKER_KEYS:
                    raise fail(key, worker[key], f"unknown key; accepted: {', '.join(WORKER_KEYS)}")
            stages = worker.get("stages")
            if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
                raise fail("stages", stages, "must be a non-empty list of node names")
            weight = worker.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or weight <= 0:
                raise fail("weight", weight, "must be a finite number > 0")
            if "target" in worker and (not isinstance(worker["target"], str) or not worker["target"].strip()):
                raise fail("target", worker["target"], "must name the worker's target model")
    return table


def config_fields(source: str | os.PathLike, default_target: str) -> dict:
    """The SpecConfig ``federated_*`` fields a topology file declares (empty without ``[federated]``)."""
    table = federated_table(source)
    if table is None:
        return {}
    workers = table["workers"]
    return {
        "federated_workers": tuple(w.get("target", default_target) for w in workers),
        "federated_weights": tuple(float(w.get("weight", 1.0)) for w in workers),
        "federated_k": table.get("top_k", fed.DENSE_K),
        "federated_strategy": table.get("strategy", fed.ZERO),
    }


def worker_layouts(config: SpecConfig) -> list[Topology]:
    """One topology per federated worker: the deployment's nodes and links with that worker's stages.

    With a topology file that has ``[federated]``, its workers' stages (their count must match
    ``config.federated_workers``); otherwise one machine per worker with ``num_stages`` stages and
    ideal links (an in-process test layout).
    """
    workers = config.federated_workers
    table = federated_table(config.topology) if config.topology else None
    if table is None:
        return [single_machine(config.num_stages, 0.0, math.inf, config.draft, w) for w in workers]
    if len(table["workers"]) != len(workers):
        raise fail("federated_workers", workers, f"{len(workers)} workers but topology {config.topology} "
                   f"declares {len(table['workers'])} in [[federated.workers]]")
    base = load_topology(config.topology)
    layouts = []
    for i, (worker, model) in enumerate(zip(table["workers"], workers)):
        layers = worker.get("layers")
        try:
            layouts.append(dataclasses.replace(
                base, stages=tuple(worker["stages"]), layers=None if layers is None else tuple(layers),
                models=dataclasses.replace(base.models, target=model)))
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{config.topology}: federated.workers[{i}].{exc}") from None
    return layouts


def describe_links(config: SpecConfig) -> str:
    """One line naming every worker's links, for reports: ``worker1: device->edge1 2ms/1000Mbps, ...``."""
    return "; ".join(f"worker{m + 1}: {layout.describe_links()}" for m, layout in enumerate(worker_layouts(config)))
