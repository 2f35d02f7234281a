"""DSD benchmark: does SpecMesh turn link latency into throughput?

On modelled links of L ms per hop, with the target in N stages, one run measures side by side:
  * target-only pipelined decoding (pays every hop per token),
  * synchronous chain speculative decoding with dense q (the classic distributed scheme),
  * SpecMesh: sparse q (top-K), chain, overlap on,
  * SpecMesh: sparse q, token tree, overlap on,
and prints tokens/s (whole generation and decode only), speedups, mean accepted length, bytes per
token and how busy each worker was. Every figure is measured in this run; nothing is assumed.

    python -m specmesh.benchmarks.dsd                          # bundled pair, 20 and 50 ms, 2 stages
    python -m specmesh.benchmarks.dsd --models tiny --latency 5,20
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from specmesh.cluster.compare import BASELINE, Run, Variant, run_side_by_side, summarise
from specmesh.cluster.links import LinkSpec
from specmesh.cluster.topology import ROLE_DEVICE, ROLE_EDGE, Link, Models, Node, Topology, dump_topology
from specmesh.runtime.api import SpecMesh
from specmesh.runtime.config import DEFAULT_DRAFT, DEFAULT_TARGET, SpecConfig

from .prompts import humaneval

TINY = ("tiny", "tiny-draft")
BUNDLED = (DEFAULT_TARGET, DEFAULT_DRAFT)
TINY_PROMPTS = [("tiny-0", [5, 17, 42, 99, 3, 250, 7, 7]), ("tiny-1", [1, 2, 3, 4, 5, 6])]  # ids < 255 (EOS)
EDGE_MBPS = 1000.0  # between edge servers: a datacentre-class link, so the device's radio is what limits
TABLE_WIDTH = 160  # the tables are wide; a pipe would squeeze them to 80 columns


def variants(gamma: int, width: int) -> list[Variant]:
    return [
        BASELINE,
        Variant("sync chain, dense q", {"sparsifier": "dense", "overlap": False, "tree_width": 1}),
        Variant("specmesh chain, top-K, overlap", {"sparsifier": "top-k", "overlap": True, "tree_width": 1}),
        Variant(f"specmesh tree x{width}, top-K, overlap",
                {"sparsifier": "top-k", "overlap": True, "tree_width": width}),
    ]


def topology(num_stages: int, latency_ms: float, up_mbps: float, down_mbps: float,
             target: str, draft: str) -> Topology:
    """One machine: a device and ``num_stages`` edge nodes, ``latency_ms`` on every hop; the device's
    uplink and downlink rates as given, edge-to-edge links at ``EDGE_MBPS``."""
    edges = [f"edge{i + 1}" for i in range(num_stages)]
    radio_up, radio_down = LinkSpec(latency_ms, up_mbps), LinkSpec(latency_ms, down_mbps)
    links = [Link("device", edges[0], up=radio_up, down=radio_down)]
    if num_stages > 1:  # the verdict comes home from the last stage over the device's downlink
        links.append(Link(edges[-1], "device", up=radio_down, down=radio_up))
    return Topology(nodes=(Node("device", ROLE_DEVICE), *(Node(e, ROLE_EDGE) for e in edges)),
                    links=tuple(links), models=Models(target=target, draft=draft), stages=tuple(edges),
                    default_link=LinkSpec(latency_ms, EDGE_MBPS),
                    name=f"device + {num_stages} edge stage(s), {latency_ms:g} ms per hop")


def run(args: argparse.Namespace, console: Console) -> dict:
    target, draft = TINY if args.models == "tiny" else BUNDLED
    if args.models == "tiny":
        prompts = TINY_PROMPTS
    else:
        prompts = humaneval(tuple(int(i) for i in args.prompts.split(",")))
    out: dict = {"config": vars(args), "cells": []}
    with tempfile.TemporaryDirectory() as tmp:
        for latency in [float(x) for x in args.latency.split(",")]:
            path = Path(tmp) / f"topology-{latency:g}.toml"
            path.write_text(dump_topology(topology(args.stages, latency, args.up_mbps, args.down_mbps, target,
                                                   draft)))
            cfg = SpecConfig(target=target, draft=draft, num_stages=args.stages, topology=str(path),
                             backend=args.backend, gamma=args.gamma, max_new_tokens=args.max_new_tokens,
                             sparse_k=args.sparse_k, dtype=args.dtype, threads=args.threads)
            t0 = time.perf_counter()
            with console.status(f"{latency:g} ms per hop: loading workers"):
                engine = SpecMesh(cfg)
            try:
                runs = run_side_by_side(
                    engine, prompts, variants(args.gamma, args.width),
                    on_run=lambda r: console.print(f"  {latency:g} ms {r.prompt_id:>12} {r.variant:<36} "
                                                   f"{r.result.stats.decode_tokens_per_s:6.2f} decode tok/s"),
                )
            finally:
                engine.close()
            cell = {"latency_ms": latency, "seconds": time.perf_counter() - t0,
                    "summary": [s.__dict__ for s in summarise(runs)],
                    "busy": {r.variant: r.result.stats.busy_fraction() for r in runs},
                    "draft_work_used": {r.variant: r.result.stats.draft_work_used for r in runs},
                    "runs": [_raw(r) for r in runs]}
            out["cells"].append(cell)
            console.print(_table(cell, args))
    return out


def _raw(r: Run) -> dict:
    s = r.result.stats
    return {"prompt": r.prompt_id, "variant": r.variant, **s.summary(), "output_ids": r.result.output_ids}


def _table(cell: dict, args: argparse.Namespace) -> Table:
    t = Table(title=f"{args.models} pair, {args.stages} stages, {cell['latency_ms']:g} ms per hop, "
                    f"uplink {args.up_mbps:g} / downlink {args.down_mbps:g} Mbit/s, {args.backend}")
    for col in ("variant", "tok/s", "speedup", "decode tok/s", "decode speedup", "acc. len",
                "up B/tok", "busy (draft / stages)", "same output"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for s in cell["summary"]:
        busy = cell["busy"].get(s["variant"], {})
        t.add_row(s["variant"], f"{s['tokens_per_s']:.2f}", f"{s['speedup']:.2f}x",
                  f"{s['decode_tokens_per_s']:.2f}", f"{s['decode_speedup']:.2f}x",
                  f"{s['mean_accepted_length']:.2f}", f"{s['bytes_up_per_token']:.0f}",
                  " / ".join(f"{busy[k]:.2f}" for k in sorted(busy)) if busy else "-",
                  "yes" if s["same_output_as_baseline"] else ("-" if s["variant"] == BASELINE.label else "no"))
    return t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m specmesh.benchmarks.dsd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", choices=("bundled", "tiny"), default="bundled", help="model pair")
    p.add_argument("--backend", choices=("local", "inproc"), default="local",
                   help="local: Ray actors (overlap needs the draft in its own process)")
    p.add_argument("--latency", default="20,50", help="per-hop latencies in ms, comma-separated")
    p.add_argument("--stages", type=int, default=2, help="target pipeline stages")
    p.add_argument("--up-mbps", type=float, default=10.0, help="device uplink rate")
    p.add_argument("--down-mbps", type=float, default=50.0, help="device downlink rate")
    p.add_argument("--prompts", default="0,2", help="HumanEval indices (bundled pair)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--gamma", type=int, default=4, help="draft depth per round")
    p.add_argument("--width", type=int, default=2, help="siblings per depth of the tree variant")
    p.add_argument("--sparse-k", type=int, default=16, help="top-K entries per drafted position")
    p.add_argument("--dtype", default="auto", help="auto: bf16 only where the hardware computes in it")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--json", type=Path, help="write every raw figure here")
    args = p.parse_args(argv)
    console = Console(width=TABLE_WIDTH)
    result = run(args, console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
        console.print(f"raw figures: {args.json}")


if __name__ == "__main__":
    main()
