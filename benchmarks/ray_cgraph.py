r"""Ray Compiled Graphs against plain actor calls for SpecMesh's round chain, side by side in one run.

    python -m specmesh.benchmarks.ray_cgraph                       # 1.5B-sized frames, 200 rounds
    python -m specmesh.benchmarks.ray_cgraph --hidden-bytes 24576 --rounds 500

A round is a fixed chain: the driver asks the draft actor for a proposal, the proposal flows to stage
0, its hidden states to stage 1, the verdict back to the driver. This measures what that chain costs
in Ray itself, with frames of the sizes a real round carries and no model work, both ways:

- ``actor calls``: what ``cluster/ray_backend.py`` does (``.remote()`` per hop, the object ref
  handed from actor to actor, ``ray.get`` of the verdict);
- ``compiled graph``: the same chain as a Ray Compiled Graph (``experimental_compile``), whose
  channels replace the per-call scheduling and object-store round trips.

The two alternate round by round so that drift of a shared machine hits both alike. Each actor owns
one CPU. The figure that matters is the difference per round, set against a round of the bundled
pair (hundreds of ms of compute): see the README's "Ray overhead" section.
"""
from __future__ import annotations

import argparse
import statistics
import time

import ray
from ray.dag import InputNode


@ray.remote(num_cpus=0)
class _Hop:
    """One worker of the chain: turns its input frame into an output frame of a fixed size."""

    def __init__(self, out_bytes: int) -> None:
        self.out = b"\x01" * out_bytes

    def step(self, frame: bytes) -> bytes:
        if not isinstance(frame, bytes):
            raise TypeError(f"expected a frame of bytes, got {type(frame).__name__}")
        return self.out


def _chain(sizes: tuple[int, int, int]) -> list:
    return [_Hop.remote(n) for n in sizes]


def _plain_round(hops: list, request: bytes) -> bytes:
    ref = hops[0].step.remote(request)
    for hop in hops[1:]:
        ref = hop.step.remote(ref)
    return ray.get(ref)


def measure(rounds: int, request_bytes: int, proposal_bytes: int, hidden_bytes: int,
            verdict_bytes: int, warmup: int = 20) -> dict[str, list[float]]:
    """Milliseconds per round of each way, measured alternately; Ray must be initialised."""
    sizes = (proposal_bytes, hidden_bytes, verdict_bytes)
    plain = _chain(sizes)
    graph_hops = _chain(sizes)
    ray.get([h.step.remote(b"") for h in plain + graph_hops])
    with InputNode() as inp:
        node = inp
        for hop in graph_hops:
            node = hop.step.bind(node)
    compiled = node.experimental_compile()
    request = b"\x02" * request_bytes
    out: dict[str, list[float]] = {"actor calls": [], "compiled graph": []}
    try:
        for i in range(warmup + rounds):
            t0 = time.perf_counter()
            a = _plain_round(plain, request)
            t1 = time.perf_counter()
            b = ray.get(compiled.execute(request))
            t2 = time.perf_counter()
            if len(a) != verdict_bytes or len(b) != verdict_bytes:
                raise RuntimeError(f"a verdict of {len(a)} / {len(b)} bytes, expected {verdict_bytes}")
            if i >= warmup:
                out["actor calls"].append((t1 - t0) * 1e3)
                out["compiled graph"].append((t2 - t1) * 1e3)
    finally:
        compiled.teardown()
    return out


def _quantile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q * 100) - 1] if len(xs) > 1 else xs[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200, help="measured rounds of each way (default 200)")
    ap.add_argument("--request-bytes", type=int, default=64, help="driver -> draft request (default 64)")
    ap.add_argument("--proposal-bytes", type=int, default=256,
                    help="draft -> stage 0 proposal: ~30 B per drafted token with top-16 q (default 256)")
    ap.add_argument("--hidden-bytes", type=int, default=8 * 1536 * 2,
                    help="stage 0 -> stage 1 hidden states: tokens x hidden x 2 B (default 8 x 1536 x 2, "
                         "the bundled 1.5B in bf16)")
    ap.add_argument("--verdict-bytes", type=int, default=48, help="last stage -> driver verdict (default 48)")
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error(f"--rounds must be >= 2, got {args.rounds}")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        res = measure(args.rounds, args.request_bytes, args.proposal_bytes, args.hidden_bytes,
                      args.verdict_bytes)
    finally:
        ray.shutdown()
    print(f"{'way':16s} {'median ms':>10s} {'p95 ms':>8s}  ({args.rounds} rounds, 3 hops, "
          f"hidden {args.hidden_bytes} B)")
    for way, xs in res.items():
        print(f"{way:16s} {statistics.median(xs):10.3f} {_quantile(xs, 0.95):8.3f}")
    saved = statistics.median(res["actor calls"]) - statistics.median(res["compiled graph"])
    print(f"compiled graph saves {saved:.3f} ms per round (median)")
    return {way: {"median_ms": statistics.median(xs), "p95_ms": _quantile(xs, 0.95)} for way, xs in res.items()}


if __name__ == "__main__":
    main()
