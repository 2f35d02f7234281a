r"""What one drafted token costs, per draft variant, measured side by side in one run.

    python -m specmesh.benchmarks.draft_cost                          # bundled 0.5B, 1 thread
    python -m specmesh.benchmarks.draft_cost --compile --tokens 24    # adds torch.compile variants
    python -m specmesh.benchmarks.draft_cost --draft tiny-draft --target tiny --quick

Each variant is the draft as ``actors/cheap_draft.make_cheaper`` ships it (dense in the model dtype,
fp32, each low-bit weight format of ``actors/lowbit.py``, int8 with a restricted LM head), optionally wrapped in
``torch.compile``. A measured token is one forward of one token over a context of ``--context``
tokens through ``actors/hf.forward`` (the call the draft worker makes), with the cache rolled back
after each so every token sees the same context. Variants alternate token by token, so drift of a
shared machine hits all alike. The target's one-token forward over the same context is measured the
same way, and the report gives each variant's draft/target cost ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from specmesh.actors import hf, models
from specmesh.actors.cheap_draft import make_cheaper
from specmesh.actors.hardware import cpu_summary


@dataclass
class Variant:
    label: str
    stage: hf.StageModel
    step: Callable[[], None]
    ms: list[float]


def _stepper(stage: hf.StageModel, context: int, compiled: bool) -> Callable[[], None]:
    """One-token forwards over a fixed ``context``-token cache (rolled back after each)."""
    if compiled:
        stage.module.model = torch.compile(stage.module.model, dynamic=True)
    cache = stage.new_cache()
    ids = torch.arange(context, dtype=torch.int64) % stage.vocab_size
    hf.forward(stage, cache, input_ids=ids, position_ids=torch.arange(context))
    token = torch.tensor([7], dtype=torch.int64)
    pos = torch.tensor([context])

    def step() -> None:
        hidden = hf.forward(stage, cache, input_ids=token, position_ids=pos)
        if stage.is_last:
            hf.lm_head(stage, hidden)
        hf.truncate_cache(cache, context)

    return step


def _load(path, dtype: torch.dtype, weights: str = "dense", head_rows: int = 0) -> hf.StageModel:
    return make_cheaper(hf.load_stage(path, dtype=dtype), weights, head_rows)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b", help="draft model (default: the bundled 0.5B)")
    ap.add_argument("--target", default="qwen2.5-coder-1.5b", help="target model, for the cost ratio")
    ap.add_argument("--dtype", default="auto", help="full-precision dtype: auto | bfloat16 | float32")
    ap.add_argument("--head-rows", type=int, default=32768, help="rows of the restricted-head variant")
    ap.add_argument("--context", type=int, default=200, help="tokens in the cache (default 200)")
    ap.add_argument("--tokens", type=int, default=16, help="measured tokens per variant (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core per actor)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile variants (minutes to compile)")
    ap.add_argument("--quick", action="store_true", help="3 tokens, context 16 (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.context = 3, 16
    if args.tokens < 1 or args.context < 1:
        ap.error(f"--tokens and --context must be >= 1, got {args.tokens} and {args.context}")
    torch.set_num_threads(args.threads)
    dtype = hf.resolve_dtype(args.dtype)
    draft_dir, target_dir = models.resolve(args.draft), models.resolve(args.target)
    specs = [(f"{str(dtype).removeprefix('torch.')}", dtype, "dense", 0), ("float32", torch.float32, "dense", 0),
             ("int8", dtype, "int8", 0), ("int4", dtype, "int4", 0), ("auto", dtype, "auto", 0),
             (f"int8 + head {args.head_rows}", dtype, "int8", args.head_rows)]
    if dtype == torch.float32:
        specs.pop(1)
    variants: list[Variant] = []
    for label, dt, weights, rows in specs:
        for compiled in (False, True) if args.compile else (False,):
            stage = _load(draft_dir, dt, weights, min(rows, hf.load_config(draft_dir).vocab_size))
            name = label + (" + compile" if compiled else "")
            t0 = time.perf_counter()
            step = _stepper(stage, args.context, compiled)
            step()  # warm-up (and, compiled, the compilation)
            print(f"loaded {name} (warm-up {time.perf_counter() - t0:.1f} s)", flush=True)
            variants.append(Variant(name, stage, step, []))
    target = hf.load_stage(target_dir, dtype=dtype)
    variants.append(Variant(f"target {str(dtype).removeprefix('torch.')}", target,
                            _stepper(target, args.context, False), []))
    variants[-1].step()
    for _ in range(args.tokens):
        for v in variants:
            t0 = time.perf_counter()
            v.step()
            v.ms.append((time.perf_counter() - t0) * 1e3)
    target_ms = statistics.median(variants[-1].ms)
    print(f"\none token over a {args.context}-token cache, {args.threads} thread(s), median of "
          f"{args.tokens}; {cpu_summary()}")
    print(f"{'variant':28s} {'ms/token':>9s} {'/ target':>9s}")
    out = {}
    for v in variants:
        med = statistics.median(v.ms)
        out[v.label] = med
        print(f"{v.label:28s} {med:9.1f} {med / target_ms:9.3f}")
    return out


if __name__ == "__main__":
    main()
