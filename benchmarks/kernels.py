r"""The linear-layer kernels a worker can compute in, side by side, per number of rows.

    python -m specmesh.benchmarks.kernels                       # the 1.5B target's shapes, M = 1..64
    python -m specmesh.benchmarks.kernels --shapes 8960x1536 --rows 1,8,16
    python -m specmesh.benchmarks.kernels --quick               # one small shape, M = 1, 8

Decoding runs one row per session, verification ~gamma + 1 rows; a kernel fit for both is cheap in
bytes and flat in rows. Candidates, all torch's own operators, on weights of the layer's shape:

- ``dense``: ``F.linear`` in the dtype (bf16 where the CPU computes it natively, else float32);
- ``int8``: ``actors/lowbit.Int8Linear`` (int8 weights per channel, activations per row, ``_int_mm``);
- ``int8 w-only``: ``aten._weight_int8pack_mm`` (int8 weights, activations left in the dtype);
- ``int4``: ``actors/lowbit.Int4Linear`` (``aten._weight_int4pack_mm_for_cpu``, groups of 32);
- ``int4 -> dense``: the int4 weight de-quantised on the fly (torch operators), then ``F.linear``.

Each figure is the best of ``--repeats`` calls (ms), one thread by default, each call on the next of
several copies of the weights (``--memory-mb`` in all), so that they come from memory as a model's
layers do; the candidates alternate per row count, so a shared machine's drift hits all alike. The
last column names the fastest.
"""
from __future__ import annotations

import argparse
import time

import torch

from specmesh.actors import hf, lowbit
from specmesh.actors.hardware import cpu_summary

# The bundled 1.5B target's linear shapes ([out, in]): q/o, k/v, gate/up, down, the LM head.
TARGET_SHAPES = ("1536x1536", "256x1536", "8960x1536", "1536x8960", "151936x1536")
ROWS = (1, 2, 4, 8, 12, 16, 32, 64)


def _best_ms(fns: list, x: torch.Tensor, repeats: int) -> float:
    """Best time of ``repeats`` calls, each on the next copy of the weights (from memory, not cache)."""
    fns[0](x)
    best = float("inf")
    for i in range(repeats):
        fn = fns[(i + 1) % len(fns)]
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def dequantised(layer: lowbit.Int4Linear) -> torch.Tensor:
    """An int4 layer's weight ``[out, in]`` in bf16, unpacked from torch's CPU layout with torch
    operators (blocks of 64 outputs: byte ``(k, j)`` holds output ``j`` in its low nibble and
    ``j + 32`` in its high one), for the de-quantise-then-``F.linear`` candidate."""
    n, k, g = layer.out_features, layer.in_features, lowbit.INT4_GROUP
    packed = layer.packed.view(n // 64, k, 32)
    q = torch.cat([packed & 15, packed >> 4], dim=2).transpose(1, 2).reshape(n, k // g, g)  # [out, groups, G]
    sz = layer.scales_zeros.transpose(0, 1)  # [out, groups, 2]
    return ((q.to(torch.bfloat16) - 8) * sz[..., :1] + sz[..., 1:]).view(n, k)


def candidates(out_f: int, in_f: int, dtype: torch.dtype, copies: int) -> dict[str, list]:
    """name -> one callable(x) per copy of a random ``[out_f, in_f]`` weight, for every candidate."""
    out: dict[str, list] = {}
    for _ in range(copies):
        dense = torch.nn.Linear(in_f, out_f, bias=False, dtype=dtype).requires_grad_(False)
        int8 = lowbit.Int8Linear(dense.weight, None)
        w8, s8 = int8.weight, int8.scale.to(dtype)  # [out, in] int8, [out]
        kernels = {"dense": dense, "int8": int8,
                   "int8 w-only": lambda x, w8=w8, s8=s8: torch.ops.aten._weight_int8pack_mm(x, w8, s8)}
        if lowbit.Int4Linear.fits(out_f, in_f):
            int4 = lowbit.Int4Linear(dense.weight, None)
            kernels["int4"] = int4
            if out_f % 64 == 0:
                kernels["int4 -> dense"] = lambda x, l=int4: torch.nn.functional.linear(x, dequantised(l).to(x.dtype))
        for name, fn in kernels.items():
            out.setdefault(name, []).append(fn)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(TARGET_SHAPES), help="OUTxIN,... (default: the 1.5B's)")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts M (default 1..64)")
    ap.add_argument("--dtype", default="auto", help="activations' dtype: auto | bfloat16 | float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per figure (best kept)")
    ap.add_argument("--memory-mb", type=int, default=96,
                    help="weights per candidate cycled through, so calls read from memory (default 96 MB)")
    ap.add_argument("--quick", action="store_true", help="one small shape, M = 1, 8, 3 calls")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.rows, args.repeats = "512x256", "1,8", 3
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        rows = [int(m) for m in args.rows.split(",")]
    except ValueError:
        ap.error(f"--shapes wants OUTxIN,... and --rows integers; got {args.shapes!r} and {args.rows!r}")
    if any(len(s) != 2 or min(s) < 1 for s in shapes) or min(rows) < 1:
        ap.error(f"shapes and rows must be positive, got {args.shapes!r} and {args.rows!r}")
    torch.set_num_threads(args.threads)
    dtype = hf.resolve_dtype(args.dtype)
    print(f"# linear kernels, ms per call (best of {args.repeats}), {args.threads} thread(s), "
          f"activations {str(dtype).removeprefix('torch.')}; {cpu_summary()}")
    results = []
    with torch.no_grad():
        for out_f, in_f in shapes:
            copies = max(1, min(8, (args.memory_mb << 20) // (out_f * in_f) + 1))  # int8 bytes per copy
            kernels = candidates(out_f, in_f, dtype, copies)
            print(f"\n[{out_f} x {in_f}]\n{'M':>4s} " + " ".join(f"{k:>14s}" for k in kernels) + "  fastest")
            for m in rows:
                x = torch.randn(m, in_f, dtype=dtype)  # [M, in]
                ms = {k: _best_ms(fns, x, args.repeats) for k, fns in kernels.items()}
                best = min(ms, key=ms.get)
                print(f"{m:>4d} " + " ".join(f"{v:>14.3f}" for v in ms.values()) + f"  {best}", flush=True)
                results.append({"shape": (out_f, in_f), "rows": m, **ms, "fastest": best})
    return results


if __name__ == "__main__":
    main()
