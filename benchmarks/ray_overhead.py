r"""What Ray costs: ms per round of the ``local`` Ray backend against ``inproc`` on the same model, side
by side in one run, and the latency of bare Ray actor calls.

    python -m specmesh.benchmarks.ray_overhead                     # tiny random models, fp32
    python -m specmesh.benchmarks.ray_overhead --target qwen2.5-coder-1.5b \
        --draft qwen2.5-coder-0.5b --dtype bfloat16 --stages 2 --max-new-tokens 32

Both engines are loaded first and every measured generation alternates between them, so drift of a
shared machine hits both alike. The links are ideal (no modelled delay): the difference is Ray's own
cost (process hops, serialisation, the object store) plus the codec work that both pay. Every worker
runs one torch thread, in process as in the actors. Greedy outputs must match: the backends then run
the same rounds, so ms per round compare like for like.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from specmesh.actors.tiny import is_tiny
from specmesh.runtime import SpecConfig, SpecMesh

TINY_PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 128, 64]
BACKENDS = ("inproc", "local")
MIN_TABLE_WIDTH = 140  # the rounds table's nine columns stay whole in logs and pipes too


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: dict
    backends: tuple[str, ...] = BACKENDS


VARIANTS = (
    Variant("target-only", {"draft": None}),
    Variant("specmesh", {"overlap": False}),
    # The Ray default: the draft actor drafts the next round while this one is verified.
    Variant("specmesh + overlap", {"overlap": True}, ("local",)),
)


@dataclass
class Sample:
    """Rounds of every measured generation of one (variant, backend)."""

    prefill_ms: list[float]
    round_ms: list[float]  # every round after the first (the prompt's)
    compute_ms: list[float]  # the stages' own compute in those rounds
    tokens: int = 0
    wall_s: float = 0.0
    rounds: int = 0
    output: list[int] | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m specmesh.benchmarks.ray_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="tiny", help="target model (bundled name, dir, HF id, tiny[:...])")
    p.add_argument("--draft", default="tiny-draft", help="draft model (same forms)")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 [default: float32 for tiny "
                                                 "models, else auto, the engine's default]")
    p.add_argument("--stages", type=int, default=2, help="target pipeline stages [2]")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per round [4]")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per generation [32]")
    p.add_argument("--repeats", type=int, default=3, help="measured generations per variant and backend [3]")
    p.add_argument("--humaneval", type=int, default=0, help="HumanEval prompt index for real models [0]")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker [1]")
    p.add_argument("--calls", type=int, default=200, help="calls per actor-latency probe [200]")
    p.add_argument("--payload-kb", type=int, default=600,
                   help="payload of the latency probe, KB (a dense q of Qwen2.5's vocabulary is ~600) [600]")
    p.add_argument("--cache-dir", default=None, help="model cache [$SPECMESH_CACHE or the user cache]")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "float32" if is_tiny(args.target) else "auto"
    return args


def _prompt(args):
    if is_tiny(args.target):
        return TINY_PROMPT
    from specmesh.benchmarks.prompts import humaneval

    return humaneval((args.humaneval,))[0][1]


def _record(sample: Sample, result) -> None:
    records = result.stats.records
    sample.prefill_ms.append(records[0].wall_ms)
    sample.round_ms += [r.wall_ms for r in records[1:]]
    sample.compute_ms += [sum(r.stage_ms) for r in records[1:]]
    sample.tokens += result.stats.generated_tokens
    sample.wall_s += result.stats.wall_s
    sample.rounds += result.stats.rounds
    sample.output = result.output_ids


def measure_rounds(engines: dict[str, SpecMesh], prompt, args) -> dict[tuple[str, str], Sample]:
    samples = {(v.label, b): Sample([], [], []) for v in VARIANTS for b in v.backends}
    for v in VARIANTS:  # warm-up, untimed
        for b in v.backends:
            engines[b].generate(prompt, max_new_tokens=4, **v.overrides)
    for _ in range(args.repeats):
        for v in VARIANTS:
            for b in v.backends:
                _record(samples[v.label, b], engines[b].generate(prompt, **v.overrides))
    return samples


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"


def rounds_table(samples: dict[tuple[str, str], Sample], title: str) -> Table:
    table = Table(title=title)
    for col in ("variant", "backend", "rounds", "tok/s", "prefill ms", "ms/round", "stage compute ms",
                "Ray - inproc ms/round", "same output"):
        table.add_column(col, justify="left" if col in ("variant", "backend") else "right")
    for (label, backend), s in samples.items():
        base = samples.get((label, "inproc")) or samples[("specmesh", "inproc")]
        delta = statistics.median(s.round_ms) - statistics.median(base.round_ms) if s.round_ms else 0.0
        table.add_row(label, backend, str(s.rounds), f"{s.tokens / s.wall_s:.2f}", _ms(s.prefill_ms),
                      _ms(s.round_ms), _ms(s.compute_ms), "-" if backend == "inproc" else f"{delta:+.1f}",
                      "yes" if s.output == base.output else "no")
    return table


def latency_table(latency: dict[str, float], payload_kb: int, calls: int) -> Table:
    table = Table(title=f"Ray actor calls (median of {calls}, async actors like the stages)")
    table.add_column("call")
    table.add_column("ms", justify="right")
    names = {"empty call": "empty call, driver -> actor",
             "payload call": f"{payload_kb} KB bytes argument, driver -> actor",
             "actor -> actor payload": f"{payload_kb} KB made by an actor, passed by ObjectRef to another"}
    for key, ms in latency.items():
        table.add_row(names[key], f"{ms:.2f}")
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from specmesh.cluster import ray_backend  # the one module that knows Ray

    console = Console(width=max(Console().width, MIN_TABLE_WIDTH))
    base = dict(target=args.target, draft=args.draft, dtype=args.dtype, num_stages=args.stages,
                gamma=args.gamma, max_new_tokens=args.max_new_tokens, threads=args.threads,
                cache_dir=args.cache_dir)
    prompt = _prompt(args)
    engines = {}
    try:
        with console.status("loading both engines..."):
            for backend in BACKENDS:
                engines[backend] = SpecMesh(SpecConfig(backend=backend, **base))
        samples = measure_rounds(engines, prompt, args)
        for engine in engines.values():  # free the models before probing Ray on its own
            engine.close()
        engines = {}
        latency = ray_backend.call_latency(args.payload_kb * 1000, args.calls)
    finally:
        for engine in engines.values():
            engine.close()
        ray_backend.shutdown()
    title = (f"ms per round, inproc vs local Ray: {args.target} / {args.draft}, {args.stages} stages, "
             f"gamma {args.gamma}, {args.max_new_tokens} new tokens x {args.repeats}, {args.dtype}, "
             f"{args.threads} thread(s) per worker, ideal links; {platform.machine()}, "
             f"{os.cpu_count()} CPUs")
    console.print(rounds_table(samples, title))
    console.print(latency_table(latency, args.payload_kb, args.calls))


if __name__ == "__main__":
    main()
