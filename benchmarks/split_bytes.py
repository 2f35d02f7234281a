"""Bytes per generated token and tokens/s of dense q, top-K q and split verification (DSSD), measured.

Run ``python -m specmesh.benchmarks.split_bytes [--models tiny|bundled] [--quick]``. For each link
(an asymmetric one, 10 Mbit/s up and 100 down, and a symmetric one) it builds an in-process engine
whose device links follow the link model (``cluster/links.py``: every message sleeps
``latency + bytes * 8 / bandwidth``), generates the same prompts with the same seeds under each
scheme, and prints what it measured: uplink and downlink bytes per generated token (the codec's
real frames), tokens/s, the acceptance rate, and whether the output equals top-K target-side
verification's (split verification must commit the same tokens, seed for seed).

Schemes: ``dense q`` (the classic scheme: full float32 q rows up), ``top-K q`` (TK-SLT: K fp16
entries per row up), ``split`` (q(x) per candidate up, p_j down at a rejection; the draft samples
from the same top-K q) and ``split, dense q`` (the draft samples from its full q, which never
leaves the device).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from specmesh.cluster.links import LinkSpec
from specmesh.cluster.topology import ROLE_DEVICE, ROLE_EDGE, Link, Models, Node, Topology, dump_topology
from specmesh.runtime.api import SpecMesh
from specmesh.runtime.config import SpecConfig

from .options import MODELS
from .prompts import humaneval
from .runner import TINY_PROMPT_ID_LIMIT, TINY_PROMPT_LEN

ASYMMETRIC = ("asymmetric 10 up / 100 down", 10.0, 100.0)  # Mbit/s, the radio uplink the papers study
SYMMETRIC_MBPS = 10.0  # both ways: the downlink as slow as the uplink, where p_j costs the most
BETWEEN_STAGES_MBPS = 1000.0  # edge to edge (a wired data-centre link)
SCHEMES = (  # label, per-call overrides
    ("dense q", {"sparsifier": "dense", "verification": "target"}),
    ("top-K q", {"sparsifier": "top-k", "verification": "target"}),
    ("split", {"sparsifier": "top-k", "verification": "split"}),
    ("split, dense q", {"sparsifier": "dense", "verification": "split"}),
)
REFERENCE = "top-K q"  # split draws from the same q: its output must equal this one's


@dataclass(frozen=True)
class Row:
    link: str
    scheme: str
    up_per_token: float
    down_per_token: float
    tokens_per_s: float
    acceptance: float
    tokens: int
    same_as_reference: bool | None


def link_topology(stages: int, latency_ms: float, up_mbps: float, down_mbps: float, models) -> Topology:
    """``device`` plus ``edge1..edgeN``; every device link ``up_mbps`` towards the edge and
    ``down_mbps`` back, ``latency_ms`` each way; edges joined by a fast wired link."""
    edges = [f"edge{i + 1}" for i in range(stages)]
    nodes = (Node("device", ROLE_DEVICE), *(Node(e, ROLE_EDGE) for e in edges))
    links = tuple(Link("device", e, LinkSpec(latency_ms, up_mbps), LinkSpec(latency_ms, down_mbps)) for e in edges)
    return Topology(nodes=nodes, links=links, models=Models(target=models.target, draft=models.draft),
                    stages=tuple(edges), default_link=LinkSpec(latency_ms, BETWEEN_STAGES_MBPS),
                    name=f"device link {up_mbps:g} up / {down_mbps:g} down Mbit/s, {latency_ms:g} ms")


def prompts(models: str, count: int, seed: int) -> list:
    if models == "tiny":
        gen = torch.Generator().manual_seed(seed)
        return [torch.randint(0, TINY_PROMPT_ID_LIMIT, (TINY_PROMPT_LEN,), generator=gen).tolist()  # [len]
                for _ in range(count)]
    return [p for _, p in humaneval(tuple(range(count)))]


def measure_link(label: str, topology: Topology, args, workdir: Path) -> list[Row]:
    """Every scheme on every prompt over one link (one engine: links are fixed at build)."""
    models = MODELS[args.models]
    path = workdir / f"{label.split()[0]}.toml"
    path.write_text(dump_topology(topology), encoding="utf-8")
    cfg = SpecConfig(target=models.target, draft=models.draft, dtype=models.dtype, threads=models.threads,
                     num_stages=args.stages, topology=str(path), cache_dir=args.cache_dir, gamma=args.gamma,
                     sparse_k=args.sparse_k, temperature=args.temperature, top_k=args.top_k,
                     max_new_tokens=args.max_new_tokens,
                     seed=args.seed)
    rows, outputs = [], {}
    with SpecMesh(cfg) as engine:
        todo = prompts(args.models, args.prompts, args.seed)
        engine.generate(todo[0], max_new_tokens=2)  # warm-up, not measured
        for scheme, overrides in SCHEMES:
            results = [engine.generate(p, seed=args.seed + i, **overrides) for i, p in enumerate(todo)]
            outputs[scheme] = [r.output_ids for r in results]
            tokens = sum(r.stats.generated_tokens for r in results)
            rows.append(Row(
                label, scheme, sum(r.stats.bytes_up for r in results) / tokens,
                sum(r.stats.bytes_down for r in results) / tokens,
                tokens / sum(r.stats.wall_s for r in results),
                statistics.fmean(r.stats.acceptance_rate for r in results), tokens, None))
    return [Row(**{**r.__dict__, "same_as_reference": outputs[r.scheme] == outputs[REFERENCE]}) for r in rows]


def table(rows: list[Row]) -> str:
    header = (f"{'link':<28} {'scheme':<15} {'B up/tok':>9} {'B down/tok':>10} {'tok/s':>7} "
              f"{'accept':>6} {'tokens':>6}  same as {REFERENCE}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.link:<28} {r.scheme:<15} {r.up_per_token:>9.1f} {r.down_per_token:>10.1f} "
                     f"{r.tokens_per_s:>7.2f} {r.acceptance:>6.2f} {r.tokens:>6}  {r.same_as_reference}")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m specmesh.benchmarks.split_bytes",
        description="Uplink/downlink bytes per generated token and tokens/s of dense q, top-K q and split "
                    "verification (DSSD), in process over modelled links.")
    parser.add_argument("--models", choices=sorted(MODELS), default="tiny",
                        help="tiny (random models, seconds) or bundled (the Qwen2.5-Coder 0.5B/1.5B pair)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    parser.add_argument("--top-k", type=int, default=0,
                        help="the session's top-k warper on p and q (0 = off): split sends p_j's support, "
                             "so a truncated p makes its downlink small (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    parser.add_argument("--prompts", type=int, default=3,
                        help="prompts: random ids (tiny) or HumanEval 0..N-1 (bundled); default 3")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="one-way latency of every link (20)")
    parser.add_argument("--symmetric-mbps", type=float, default=SYMMETRIC_MBPS,
                        help=f"bandwidth both ways of the symmetric link (default {SYMMETRIC_MBPS:g})")
    parser.add_argument("--stages", type=int, default=1, help="target pipeline stages (default 1)")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens per round (default 4)")
    parser.add_argument("--sparse-k", type=int, default=16, help="K of top-K q (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="model cache (default: $SPECMESH_CACHE)")
    parser.add_argument("--quick", action="store_true",
                        help="one prompt, 12 tokens, 5 ms links: a smoke run (numbers are not figures)")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens, args.latency_ms = 1, 12, 5.0
    if args.prompts < 1 or args.max_new_tokens < 2 or args.temperature < 0 or args.top_k < 0:
        parser.error(f"need --prompts >= 1, --max-new-tokens >= 2, --temperature >= 0 and --top-k >= 0; got "
                     f"{args.prompts}, {args.max_new_tokens}, {args.temperature}, {args.top_k}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(MODELS[args.models].threads)
    models = MODELS[args.models]
    links = [ASYMMETRIC, (f"symmetric {args.symmetric_mbps:g} / {args.symmetric_mbps:g}",
                          args.symmetric_mbps, args.symmetric_mbps)]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="specmesh-split-") as tmp:
        for label, up, down in links:
            topo = link_topology(args.stages, args.latency_ms, up, down, models)
            rows += measure_link(label, topo, args, Path(tmp))
    print(f"models {args.models} ({models.target} / {models.draft}, {models.dtype}), temperature "
          f"{args.temperature:g}, top-k {args.top_k or 'off'}, gamma {args.gamma}, K {args.sparse_k}, {args.prompts} prompt(s) x "
          f"{args.max_new_tokens} tokens, {args.stages} stage(s), {args.latency_ms:g} ms per link, in process")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
