"""Side-by-side runs: target-only pipelined decoding vs SpecMesh, same engine, same prompts, one run.

Both go through the same workers and the same links; only the draft is switched off for the
baseline. Ratios are therefore measured, never assumed. ``specmesh run --compare`` and ``specmesh demo``
print these summaries (:mod:`specmesh.cluster.report`); the benchmarks build on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from specmesh.runtime.api import GenerationResult, SpecMesh


@dataclass(frozen=True)
class Variant:
    """One configuration to run: a label and the per-call overrides of the engine config."""

    label: str
    overrides: dict = field(default_factory=dict)


BASELINE = Variant("target-only", {"draft": None})
# An untimed generation this long runs every step once (prefill, a round, commit) before the clock starts.
WARMUP_TOKENS = 4


@dataclass(frozen=True)
class Run:
    """One (prompt, variant) run."""

    prompt_id: str
    variant: str
    result: GenerationResult


def run_side_by_side(
    engine: SpecMesh,
    prompts: Sequence[tuple[str, str | list[int]]],
    variants: Sequence[Variant],
    on_run: Callable[[Run], None] | None = None,
    on_tokens: Callable[[str, str, list[int], str | None], None] | None = None,
    warmup: bool = True,
) -> list[Run]:
    """Runs every variant on every prompt, interleaved per prompt so drift hits all alike.

    Args:
        engine: the loaded engine (its config gives the defaults).
        prompts: ``(id, prompt)`` pairs.
        variants: configurations; usually ``BASELINE`` first.
        on_run: called after each run (progress).
        on_tokens: called with (prompt id, variant, new tokens, text) as they stream.
        warmup: one short untimed generation first (lazy initialisation, caches).
    """
    if warmup and prompts:
        engine.generate(prompts[0][1], max_new_tokens=WARMUP_TOKENS)
    runs = []
    for pid, prompt in prompts:
        for v in variants:
            gen = engine.generation(prompt, **v.overrides)
            for new in gen:
                if on_tokens is not None:
                    text = engine.tokenizer.decode(new) if engine.tokenizer is not None else None
                    on_tokens(pid, v.label, new, text)
            text = engine.tokenizer.decode(gen.output_ids, skip_special_tokens=True) if engine.tokenizer else None
            result = GenerationResult(gen.prompt, gen.output_ids, text, gen.finish_reason, gen.stats)
            run = Run(pid, v.label, result)
            runs.append(run)
            if on_run is not None:
                on_run(run)
    return runs


@dataclass(frozen=True)
class Summary:
    """Aggregate of one variant over all prompts (token-weighted throughput)."""

    variant: str
    tokens: int
    wall_s: float
    tokens_per_s: float
    speedup: float
    decode_tokens_per_s: float
    decode_speedup: float
    mean_accepted_length: float
    acceptance_rate: float
    bytes_up_per_token: float
    bytes_down_per_token: float
    same_output_as_baseline: bool | None  # None when no baseline ran


def summarise(runs: list[Run], baseline: str = BASELINE.label) -> list[Summary]:
    """Per-variant totals; speedup = variant tokens/s over the baseline's on the same prompts (a
    variant run on fewer prompts than the baseline is compared with the baseline on those alone)."""
    by_variant: dict[str, list[Run]] = {}
    for r in runs:
        by_variant.setdefault(r.variant, []).append(r)
    base_runs = by_variant.get(baseline, [])
    base_outputs = {r.prompt_id: r.result.output_ids for r in base_runs}
    out = []
    for name, rs in by_variant.items():
        prompts = {r.prompt_id for r in rs}
        base = [r for r in base_runs if r.prompt_id in prompts]
        base_tps, base_decode = _tps(base), _decode_tps(base)
        tokens = sum(r.result.stats.generated_tokens for r in rs)
        rounds = sum(r.result.stats.rounds for r in rs)
        accepted = sum(r.result.stats.accepted for r in rs)
        drafted = sum(r.result.stats.drafted for r in rs)
        wall = sum(r.result.stats.wall_s for r in rs)
        tps = _tps(rs)
        out.append(Summary(
            variant=name, tokens=tokens, wall_s=wall, tokens_per_s=tps,
            speedup=tps / base_tps if base_tps else float("nan"),
            decode_tokens_per_s=_decode_tps(rs),
            decode_speedup=_decode_tps(rs) / base_decode if base_decode else float("nan"),
            mean_accepted_length=(accepted + rounds) / rounds if rounds else 0.0,
            acceptance_rate=accepted / drafted if drafted else 0.0,
            bytes_up_per_token=sum(r.result.stats.bytes_up for r in rs) / tokens if tokens else 0.0,
            bytes_down_per_token=sum(r.result.stats.bytes_down for r in rs) / tokens if tokens else 0.0,
            same_output_as_baseline=all(
                base_outputs.get(r.prompt_id) == r.result.output_ids for r in rs
            ) if base_outputs else None,
        ))
    return out


def _decode_tps(runs: list[Run]) -> float:
    """Token-weighted decoding speed after each run's first round (the prompt's prefill)."""
    tokens = sum(r.result.stats.generated_tokens - r.result.stats.records[0].committed
                 for r in runs if r.result.stats.records)
    wall = sum(r.result.stats.wall_s - r.result.stats.first_round_s for r in runs)
    return tokens / wall if wall > 0 else 0.0


def _tps(runs: list[Run]) -> float:
    tokens = sum(r.result.stats.generated_tokens for r in runs)
    wall = sum(r.result.stats.wall_s for r in runs)
    return tokens / wall if wall else 0.0
