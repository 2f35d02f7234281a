r"""Throughput under load: aggregate tokens/s and time per output token at 1, 4 and 16 concurrent
clients, batched rounds (``batch_sessions`` = the most clients) against unbatched (``batch_sessions=1``).

    python -m specmesh.benchmarks.concurrency --models tiny --quick           # a smoke run
    python -m specmesh.benchmarks.concurrency --models bundled --clients 1,4,16
    python -m specmesh.benchmarks.concurrency --models bundled --backend local \
        --topology cluster/examples/one_machine.toml

Each client is one session (``SpecMesh.generate_many`` with one thread per client), all started at
once, each with its own prompt (HumanEval for the bundled pair, seeded random ids for tiny models)
and the same ``--max-new-tokens``. Aggregate tokens/s = every client's tokens / the wall time of the
wave; time per output token (TPOT) per client = (its wall time - its first round) / (its tokens
after the first round), as vLLM counts it; p50/p95 over the clients of the wave; decode tokens/s =
the clients' 1 / TPOT summed, the throughput once the prompts are in (prefill is compute-bound:
sixteen prompts cost sixteen times one, batched or not, so at short outputs it dominates the
aggregate). Modes: ``batched`` (lockstep rounds, the default engine), ``free`` (batched forwards,
sessions not held in step), ``unbatched`` (``batch_sessions=1``). Each engine is
warmed up with one generation first. Every weight format batches (``actors/lowbit.py``), the
defaults included.
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

from specmesh.actors.hardware import cpu_summary
from specmesh.runtime import SpecConfig, SpecMesh
from specmesh.runtime.config import WEIGHT_FORMATS

from .options import MODELS


@dataclass(frozen=True)
class Wave:
    """One wave of ``clients`` concurrent sessions."""

    mode: str
    clients: int
    tokens: int
    wall_s: float
    tpot_ms: list[float]
    batches: dict[int, int]  # target stage 0's forwards by batch size during the wave (in process)
    together: float | None = None  # sessions that started a round together, mean per gate cycle
    in_flight: float | None = None  # sessions in flight at those moments, mean per gate cycle

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def tpot(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the clients' time per output token, ms."""
        xs = sorted(self.tpot_ms)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """The clients' decoding rates summed (each 1 / its TPOT): throughput once prompts are in."""
        return sum(1e3 / t for t in self.tpot_ms if t > 0)

    @property
    def mean_batch(self) -> float | None:
        n = sum(self.batches.values())
        return sum(k * c for k, c in self.batches.items()) / n if n else None


def prompts(models: str, count: int, seed: int = 0) -> list:
    """``count`` different prompts: HumanEval's first problems, or random token ids (tiny models)."""
    if models == "bundled":
        from .prompts import humaneval

        return [p for _, p in humaneval(tuple(i % 164 for i in range(count)))]
    rng = random.Random(seed)
    return [[rng.randrange(1, 256) for _ in range(rng.randrange(4, 24))] for _ in range(count)]


def _tpot_ms(stats) -> float:
    after_first = stats.generated_tokens - (stats.records[0].committed if stats.records else 0)
    return 1e3 * (stats.wall_s - stats.first_round_s) / max(after_first, 1)


def _stage0_batches(engine: SpecMesh) -> dict[int, int]:
    stats = getattr(engine.backend.target, "batch_stats", None)
    per_stage = stats() if stats is not None else []
    return dict(per_stage[0]) if per_stage else {}


def _gate_stats(engine: SpecMesh) -> dict[str, int]:
    return engine.gate.stats() if engine.gate is not None else {"cycles": 0, "sessions": 0, "members": 0}


def run_wave(engine: SpecMesh, mode: str, models: str, clients: int, max_new_tokens: int) -> Wave:
    before, gate_before = _stage0_batches(engine), _gate_stats(engine)
    t0 = time.perf_counter()
    results = engine.generate_many(prompts(models, clients), concurrency=clients, max_new_tokens=max_new_tokens)
    wall = time.perf_counter() - t0
    after, gate_after = _stage0_batches(engine), _gate_stats(engine)
    batches = {k: c - before.get(k, 0) for k, c in after.items() if c - before.get(k, 0)}
    cycles = gate_after["cycles"] - gate_before["cycles"]
    together, in_flight = ((gate_after[k] - gate_before[k]) / cycles if cycles else None
                           for k in ("sessions", "members"))
    return Wave(mode, clients, sum(len(r.output_ids) for r in results), wall,
                [_tpot_ms(r.stats) for r in results], batches, together, in_flight)


def config_for(args, batch_sessions: int, lockstep: bool = True) -> SpecConfig:
    m = MODELS[args.models]
    # A topology's nodes name their cores, and so their threads (one per core owned).
    threads = args.threads or (None if args.topology else m.threads)
    kw = dict(target=args.target or m.target, draft=args.draft or m.draft, dtype=args.dtype or m.dtype,
              threads=threads, backend=args.backend, weights=args.weights, draft_weights=args.draft_weights, batch_sessions=batch_sessions, lockstep=lockstep,
              gamma=args.gamma, max_new_tokens=args.max_new_tokens)
    if args.topology:
        from specmesh.cluster.inproc import config_from_topology

        return config_from_topology(args.topology, **{k: v for k, v in kw.items() if k not in ("target", "draft")})
    return SpecConfig(num_stages=args.stages, **kw)


def table(waves: list[Wave]) -> str:
    one = {w.mode: w.tokens_per_s for w in waves if w.clients == 1}
    one_decode = {w.mode: w.decode_tokens_per_s for w in waves if w.clients == 1}
    unbatched = {w.clients: w.tokens_per_s for w in waves if w.mode == "unbatched"}
    rows = ["| mode | clients | tokens | aggregate tokens/s | x one client | x unbatched | "
            "decode tokens/s (sum 1/TPOT) | x one client | TPOT p50 ms | TPOT p95 ms | mean batch (stage 0) | "
            "sessions per round start (of in flight) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in waves:
        ratio = w.tokens_per_s / one[w.mode] if w.mode in one else float("nan")
        vs = w.tokens_per_s / unbatched[w.clients] if w.clients in unbatched else float("nan")
        batch = f"{w.mean_batch:.1f}" if w.mean_batch is not None else "-"
        together = f"{w.together:.1f} of {w.in_flight:.1f}" if w.together is not None else "-"
        dec = w.decode_tokens_per_s / one_decode[w.mode] if one_decode.get(w.mode) else float("nan")
        rows.append(f"| {w.mode} | {w.clients} | {w.tokens} | {w.tokens_per_s:.1f} | {ratio:.2f}x | {vs:.2f}x | "
                    f"{w.decode_tokens_per_s:.1f} | {dec:.2f}x | {w.tpot(0.5):.0f} | {w.tpot(0.95):.0f} | {batch} | {together} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m specmesh.benchmarks.concurrency", description=__doc__.split("\n")[0])
    ap.add_argument("--models", choices=sorted(MODELS), default="bundled")
    ap.add_argument("--target", default=None, help="override the model set's target (e.g. a larger tiny:...)")
    ap.add_argument("--draft", default=None, help="override the model set's draft")
    ap.add_argument("--backend", choices=("inproc", "local"), default="inproc")
    ap.add_argument("--topology", default=None, help="a topology TOML (stages, links, cores)")
    ap.add_argument("--stages", type=int, default=2, help="target stages without --topology")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--weights", choices=WEIGHT_FORMATS, default="auto", help="target stages' weight format")
    ap.add_argument("--draft-weights", choices=WEIGHT_FORMATS, default="auto", help="the draft's weight format")
    ap.add_argument("--dtype", default=None, help="default: the model set's (float32 tiny, auto bundled)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    ap.add_argument("--modes", default="batched,unbatched",
                    help="batched (lockstep rounds), free (batched, no lockstep), unbatched")
    ap.add_argument("--quick", action="store_true", help="clients 1,4; 12 tokens (a smoke run)")
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    if args.quick:
        clients, args.max_new_tokens = [c for c in clients if c <= 4] or [1], min(args.max_new_tokens, 12)
    if min(clients) < 1:
        raise SystemExit(f"--clients must be >= 1, got {args.clients}")
    clients = sorted(set(clients) | {1})  # one client is what every ratio is against
    modes = args.modes.split(",")
    if not set(modes) <= {"batched", "free", "unbatched"}:
        raise SystemExit(f"--modes must name batched, free and/or unbatched, got {args.modes}")
    print(f"# concurrency: models {args.models}, backend {args.backend}, topology {args.topology or '-'}, "
          f"{args.max_new_tokens} tokens per client, gamma {args.gamma}, weights {args.weights}, "
          f"draft weights {args.draft_weights}; "
          f"{cpu_summary()}")
    waves: list[Wave] = []
    for mode in modes:
        batch = 1 if mode == "unbatched" else max(clients)
        with SpecMesh(config_for(args, batch, lockstep=mode != "free")) as engine:
            engine.generate(prompts(args.models, 1)[0], max_new_tokens=4)  # warm-up
            for c in clients:
                waves.append(run_wave(engine, mode, args.models, c, args.max_new_tokens))
                print(f"{mode:9s} {c:3d} clients: {waves[-1].tokens_per_s:8.1f} tokens/s", flush=True)
    print(table(waves))


if __name__ == "__main__":
    main()
