"""SpecFed figures: bytes per generated token, acceptance and distance from the dense average.

Run ``python -m specmesh.benchmarks.federated [--models tiny|bundled] [--quick] [--ks 1,8,64]``. For M = 2 and 3
federated workers (tiny random models of different seeds by default; ``--models bundled`` uses the
bundled Qwen2.5-Coder 0.5B and 1.5B as two workers, M = 2 only) it generates with the in-process
federated backend at temperature 1, once dense (K = V: the exact weighted average) and then for every
K and reconstruction strategy, on the same prompts and seeds, and prints per setting:

- bytes per generated token on the device's links (the proposal up to every worker, every worker's
  top-K reply down), from the traffic meter;
- the acceptance rate (accepted / drafted);
- the mean, over every verified position, of TV(reconstructed average, dense average) measured
  against the workers' true p (:attr:`FederatedTarget.probe`), and of the bound the aggregator
  computed for it; and the mean acceptance-rate bias |alpha(average, q) - alpha(dense, q)| at the
  drafted positions.

``--ray`` instead runs the shipped SpecFed topology (``cluster/examples/federated_tiny.toml``: two tiny
workers, the second in two stages, 2 ms links) on local Ray (every stage its own actor, the workers
verifying in parallel) and in process, and prints tokens/s and the bytes per generated token on each
worker link, and whether both committed the same tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from specmesh.cluster.federated import build_federated
from specmesh.policies import federated as fed
from specmesh.runtime import SpecMesh
from specmesh.runtime.config import SpecConfig

TOP_KS = (1, 2, 4, 8, 16, 32, 64)
QUICK_KS = (1, 8)
TINY_WORKERS = ("tiny:seed=1", "tiny:seed=2", "tiny:seed=3")
TINY_DRAFT = "tiny-draft:seed=1"  # worker 1 perturbed (noise 0.05): close to it, far from the others
BUNDLED_WORKERS = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
BUNDLED_DRAFT = "qwen2.5-coder-0.5b"
WEIGHTS = {2: (2.0, 1.0), 3: (3.0, 2.0, 1.0)}  # normalised by the settings
TINY_PROMPTS = ([5, 17, 42, 99, 3, 250, 7, 7], [1, 2, 3, 4, 5, 6])
TEXT_PROMPTS = ("def fibonacci(n):", "Speculative decoding lets a small draft model")


@dataclass
class Row:
    """One setting's figures."""

    workers: int
    strategy: str
    k: int  # 0 = dense
    bytes_up: float  # per generated token
    bytes_down: float
    acceptance: float
    tv: float  # mean TV(average, dense average) per verified position
    bound: float  # mean bound the aggregator computed
    acc_bias: float  # mean |alpha(average, q) - alpha(dense, q)| per drafted position


class _Meter:
    """The probe: accumulates TV, bound and acceptance bias against the dense average."""

    def __init__(self, weights: tuple[float, ...]) -> None:
        self.weights = weights
        self.tv = self.bound = self.bias = 0.0
        self.rows = self.drafted = 0

    def __call__(self, proposal, truths, agg) -> None:
        dense = sum(w * p.double() for w, p in zip(self.weights, truths))  # [g + 1, V]
        self.tv += float(fed.total_variation(agg.average, dense).sum())
        self.bound += float(agg.bound.sum())
        self.rows += int(dense.shape[0])
        g = proposal.num_candidates
        if g:
            q = proposal.q.to_dense()
            diff = fed.acceptance_rate(agg.average[:g], q) - fed.acceptance_rate(dense[:g], q)
            self.bias += float(diff.abs().sum())
            self.drafted += g


def _measure(engine: SpecMesh, target, settings, prompts, tokens: int, workers: int) -> Row:
    meter = _Meter(settings.weights)
    target.probe = meter
    up = down = generated = drafted = accepted = 0
    for i, prompt in enumerate(prompts):
        result = engine.generate(prompt, max_new_tokens=tokens, seed=i)
        up, down = up + result.stats.bytes_up, down + result.stats.bytes_down
        generated += len(result.output_ids)
        drafted, accepted = drafted + result.stats.drafted, accepted + result.stats.accepted
    n = max(generated, 1)
    return Row(workers, settings.strategy if settings.top_k else "dense", settings.top_k, up / n, down / n,
               accepted / max(drafted, 1), meter.tv / max(meter.rows, 1), meter.bound / max(meter.rows, 1),
               meter.bias / max(meter.drafted, 1))


def run(models: str = "tiny", quick: bool = False, tokens: int | None = None, gamma: int = 4,
        cache_dir: str | None = None, out=sys.stdout, ks: tuple[int, ...] | None = None) -> list[Row]:
    """Measures every setting (``ks``: the top-K values, default by ``quick``); prints and returns
    the table's rows."""
    bundled = models == "bundled"
    names, draft = (BUNDLED_WORKERS, BUNDLED_DRAFT) if bundled else (TINY_WORKERS, TINY_DRAFT)
    counts = (2,) if bundled or quick else (2, 3)
    ks = ks or (QUICK_KS if quick else TOP_KS)
    prompts = TEXT_PROMPTS if bundled else (TINY_PROMPTS[:1] if quick else TINY_PROMPTS)
    tokens = tokens or (12 if quick else 32)
    rows = []
    for m in counts:
        config = SpecConfig(target=names[0], draft=draft, dtype="float32", num_stages=1, gamma=gamma,
                            temperature=1.0, federated_workers=names[:m], federated_weights=WEIGHTS[m],
                            cache_dir=cache_dir)
        backend = build_federated(config)
        try:
            base = backend.target
            settings = [fed.FederatedSettings(WEIGHTS[m], 0, fed.ZERO)]
            settings += [fed.FederatedSettings(WEIGHTS[m], k, s) for s in fed.STRATEGIES for k in ks]
            for s in settings:
                target = base.with_settings(s)
                engine = SpecMesh(config, dataclasses.replace(backend, target=target))
                rows.append(_measure(engine, target, s, prompts, tokens, m))
        finally:
            backend.close()
    _print(rows, models, names, counts, prompts, tokens, gamma, out)
    return rows


def _print(rows, models, names, counts, prompts, tokens, gamma, out) -> None:
    which = ("bundled Qwen2.5-Coder 0.5B and 1.5B as the two workers" if models == "bundled"
             else f"tiny random models {', '.join(names[:max(counts)])} (not real LMs)")
    print(f"SpecFed, in process, ideal links: workers = {which}; weights {WEIGHTS[2]} (M=2), "
          f"{WEIGHTS[3]} (M=3), normalised; {len(prompts)} prompt(s) x {tokens} tokens, gamma {gamma}, "
          "temperature 1, draft top-16 q. K = 0 is dense (the exact weighted average).", file=out)
    head = f"{'M':>2} {'strategy':<15}{'K':>4} {'B/tok up':>9} {'B/tok down':>11} {'accept':>7} " \
           f"{'TV avg':>8} {'bound':>8} {'acc bias':>9}"
    print(head, file=out)
    for r in rows:
        print(f"{r.workers:>2} {r.strategy:<15}{r.k:>4} {r.bytes_up:>9.1f} {r.bytes_down:>11.1f} "
              f"{r.acceptance:>7.3f} {r.tv:>8.4f} {r.bound:>8.4f} {r.acc_bias:>9.4f}", file=out)


RAY_EXAMPLE = "federated_tiny"
RAY_BACKENDS = ("inproc", "local")


def _link_bytes(before, after) -> dict[tuple[str, str], int]:
    """Bytes counted on each (link, direction) between two traffic snapshots."""
    old = {(r["link"], r["direction"]): r["bytes"] for r in before.as_rows()}
    return {(r["link"], r["direction"]): r["bytes"] - old.get((r["link"], r["direction"]), 0)
            for r in after.as_rows()}


def ray_run(tokens: int = 64, cache_dir: str | None = None, out=sys.stdout) -> dict:
    """The shipped SpecFed topology in process and on local Ray: tokens/s, bytes per generated
    token on every worker link, the same committed tokens. Returns ``{backend: (tok/s, {link: B/tok},
    outputs)}``."""
    from specmesh.cluster import ray_backend
    from specmesh.cluster.inproc import config_from_topology
    from specmesh.cluster.topology import example_path

    path = str(example_path(RAY_EXAMPLE))
    figures = {}
    try:
        for backend in RAY_BACKENDS:
            config = config_from_topology(path, backend=backend, dtype="float32", threads=1, temperature=1.0,
                                          cache_dir=cache_dir, max_new_tokens=tokens)
            with SpecMesh(config) as engine:
                engine.generate(TINY_PROMPTS[0], max_new_tokens=4)  # warm-up
                before = engine.backend.traffic.snapshot()
                results = [engine.generate(p, seed=i) for i, p in enumerate(TINY_PROMPTS)]
                counted = _link_bytes(before, engine.backend.traffic.snapshot())
            generated = sum(len(r.output_ids) for r in results)
            figures[backend] = (generated / sum(r.stats.wall_s for r in results),
                                {k: v / generated for k, v in counted.items()}, [r.output_ids for r in results])
    finally:
        ray_backend.shutdown()
    print(f"SpecFed, {path}: tiny:seed=1 (weight 2, edge1) and tiny:seed=2 (weight 1, edge2 + edge3), "
          f"top-8 spread-q, 2 ms / 1000 Mbit/s links; draft tiny-draft:seed=1, fp32, temperature 1, "
          f"{len(TINY_PROMPTS)} prompts x {tokens} tokens (tok/s over each generation's wall time, prefill "
          "included)", file=out)
    same = figures["inproc"][2] == figures["local"][2]
    for backend in RAY_BACKENDS:
        print(f"  {backend:<7} {figures[backend][0]:7.1f} tok/s", file=out)
    print(f"  same tokens on both: {same}", file=out)
    print(f"  {'link':<26}{'dir':>5}{'B/tok inproc':>14}{'B/tok local':>13}", file=out)
    for key in sorted(figures["local"][1]):
        print(f"  {key[0]:<26}{key[1]:>5}{figures['inproc'][1].get(key, 0):>14.1f}{figures['local'][1][key]:>13.1f}",
              file=out)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specmesh.benchmarks.federated", description=__doc__.split("\n")[0])
    parser.add_argument("--models", choices=("tiny", "bundled"), default="tiny",
                        help="tiny random workers (default) or the bundled 0.5B and 1.5B as two workers")
    parser.add_argument("--quick", action="store_true", help="K in 1, 8; M = 2; one short prompt (tests)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per prompt")
    parser.add_argument("--gamma", type=int, default=4, help="draft depth per round")
    parser.add_argument("--cache-dir", default=None, help="model cache directory")
    parser.add_argument("--ks", default=None, help="top-K values, comma-separated (default 1..64 by powers of 2)")
    parser.add_argument("--ray", action="store_true",
                        help="the shipped tiny SpecFed topology on local Ray and in process: tok/s, bytes per worker link")
    args = parser.parse_args(argv)
    ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else None
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or (tmp if args.models == "tiny" else None)
        if args.ray:
            ray_run(args.tokens or 64, cache)
        else:
            run(args.models, args.quick, args.tokens, args.gamma, cache, ks=ks)
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
