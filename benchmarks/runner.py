"""How ``specmesh bench`` measures: engines over modelled links, side-by-side runs, spreads.

A :class:`Bench` holds one engine at a time (links are fixed when workers are built), runs variants
side by side with their baseline (``specmesh.cluster.compare.run_side_by_side``) ``repeats`` times, and
keeps every raw run. Ratios are taken within one repetition (``compare.summarise``), then summarised as
mean and min..max over the repetitions by :func:`stat`.
"""
from __future__ import annotations

import dataclasses
import gc
import math
from pathlib import Path
from typing import Callable, Mapping

import torch
from rich.console import Console
from rich.progress import Progress

from specmesh.cluster.compare import BASELINE, Run, Summary, Variant, run_side_by_side, summarise
from specmesh.cluster.topology import Topology, dump_topology, single_machine
from specmesh.runtime.api import SpecMesh
from specmesh.runtime.config import SpecConfig

from .options import BenchOptions, Grid, ModelSet
from .prompts import humaneval

TINY_PROMPTS = 3  # random token-id prompts for tiny models (they have no tokenizer)
TINY_PROMPT_LEN = 12
# Prompt ids are drawn below this: the tiny models' vocabulary (256, actors.tiny) without its EOS id (255).
TINY_PROMPT_ID_LIMIT = 255
_SUMMARY_FIELDS = ("tokens_per_s", "speedup", "mean_accepted_length", "acceptance_rate",
                   "bytes_up_per_token", "bytes_down_per_token", "wall_s", "tokens")


def stat(values: list[float]) -> dict:
    """Mean and range of one figure over repetitions (every value kept)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "min": None, "max": None, "values": values}
    return {"mean": sum(finite) / len(finite), "min": min(finite), "max": max(finite), "values": values}


def spread(per_repeat: list[list[Summary]]) -> dict[str, dict]:
    """Per variant, every summary figure as :func:`stat` over the repetitions."""
    out: dict[str, dict] = {}
    for variant in [s.variant for s in per_repeat[0]]:
        rows = [next(s for s in rep if s.variant == variant) for rep in per_repeat]
        out[variant] = {f: stat([getattr(r, f) for r in rows]) for f in _SUMMARY_FIELDS}
        same = [r.same_output_as_baseline for r in rows]  # None: no baseline ran
        out[variant]["same_output_as_baseline"] = None if None in same else all(same)
    return out


def run_record(run: Run, repeat: int, decode: Callable | None) -> dict:
    """Every raw figure of one run (JSON-ready)."""
    s = run.result.stats
    row = {
        "prompt_id": run.prompt_id, "variant": run.variant, "repeat": repeat,
        "prompt_tokens": s.prompt_tokens, "tokens": s.generated_tokens, "wall_s": s.wall_s,
        "rounds": s.rounds, "drafted": s.drafted, "accepted": s.accepted,
        "acceptance_rate": s.acceptance_rate, "mean_accepted_length": s.mean_accepted_length,
        "per_position_acceptance": s.per_position_acceptance, "tokens_per_s": s.tokens_per_s,
        "bytes_up": s.bytes_up, "bytes_down": s.bytes_down, "bytes_between_stages": s.bytes_between_stages,
        "finish_reason": run.result.finish_reason, "output_ids": run.result.output_ids,
        # where the rounds' time went (SessionStats.profile, ms summed over rounds) and the draft's
        # speculation: the report's profile table (as `specmesh run --profile` prints it)
        "profile_ms": s.profile(), "proposals": s.draft_counters.get("proposals", 0),
        "proposals_hit": s.draft_counters.get("proposals_hit", 0),
        # every round: drafted, accepted, committed, wall / draft / stage-compute ms (lengths replays them)
        "round_log": [[r.gamma, r.accepted, r.committed, round(r.wall_ms, 3), round(r.draft_ms, 3),
                       round(sum(r.stage_ms), 3)] for r in s.records],
    }
    if decode is not None:
        row["text"] = decode(run.result.output_ids)
    return row


class Bench:
    """One ``specmesh bench`` invocation: options, the engine in use, progress, results."""

    def __init__(self, options: BenchOptions, models: ModelSet, grid: Grid, console: Console,
                 progress: Progress, checkpoint: Callable[[str, dict], None] | None = None) -> None:
        self.options = options
        self.grid = grid
        self.models = models
        self.threads = options.threads or models.threads
        self.repeats = options.repeats or grid.repeats
        self.console = console
        self.progress = progress
        self.checkpoint = checkpoint  # called with (label, measurement) after every measurement
        self._engine: tuple[tuple, SpecMesh, Topology] | None = None
        self._prompts: list[tuple[str, str | list[int]]] | None = None

    def config(self, **kw) -> SpecConfig:
        m = self.models
        return SpecConfig(target=m.target, draft=m.draft, dtype=m.dtype, threads=self.threads,
                          seed=self.options.seed, cache_dir=self.options.cache_dir, **kw)

    def engine(self, num_stages: int, latency_ms: float) -> tuple[SpecMesh, Topology, Path]:
        """The engine over ``num_stages`` stages on one machine, ``latency_ms`` per hop (links are
        fixed when workers are built, so a new link means a new engine; one is kept at a time)."""
        key = (num_stages, latency_ms)
        topo = single_machine(num_stages, latency_ms, self.options.bandwidth_mbps, self.models.draft,
                              self.models.target)
        path = self.options.out / "topologies" / f"{num_stages}-stages-{latency_ms:g}ms.toml"
        if self._engine is None or self._engine[0] != key:
            self.close()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dump_topology(topo), encoding="utf-8")
            with self.console.status(f"loading {self.models.target} in {num_stages} stage(s)"):
                engine = SpecMesh(self.config(num_stages=num_stages, topology=str(path)))
            self._engine = (key, engine, topo)
        return self._engine[1], topo, path

    def close(self) -> None:
        if self._engine is not None:
            self._engine[1].close()
            self._engine = None
            gc.collect()

    def prompts(self, scenario: str) -> list[tuple[str, str | list[int]]]:
        """``(id, prompt)`` pairs of ``scenario``: seeded random ids (tiny models) or HumanEval prompts."""
        if self._prompts is None:
            if self.options.models == "tiny":
                gen = torch.Generator().manual_seed(self.options.seed)
                self._prompts = []
                for i in range(TINY_PROMPTS):
                    self._prompts.append((f"random-{i}", _random_prompt(gen)))
            else:
                self._prompts = humaneval(self.options.problems)
        return self._prompts[: self.grid.prompts.get(scenario, len(self._prompts))]

    def warmup_prompts(self) -> list[tuple[str, str | list[int]]]:
        """``(id, prompt)`` of ``--warmup-problems``: HumanEval prompts, or for tiny models random ids
        from a stream seeded apart from the measured prompts' (``seed + 1 + index``)."""
        if self.options.models != "tiny":
            return humaneval(self.options.warmup_problems)
        return [(f"warmup-random-{i}", _random_prompt(torch.Generator().manual_seed(self.options.seed + 1 + i)))
                for i in self.options.warmup_problems]

    def tokens(self, scenario: str) -> int:
        if scenario != "quality" and self.options.max_new_tokens:
            return self.options.max_new_tokens
        return self.grid.tokens[scenario]

    def measure(self, label: str, engine: SpecMesh, prompts, variants: list[Variant], *,
                baseline: str = BASELINE.label, repeats: int | None = None, common: dict | None = None,
                seeds: Callable[[int, int], int] | None = None) -> dict:
        """Runs ``variants`` side by side on ``prompts``, ``repeats`` times; raw runs and spreads.

        ``seeds(i, r)``, when given, is the seed of prompt ``i``'s runs in repetition ``r`` (every
        variant alike); otherwise every run has ``--seed``.
        """
        repeats = repeats or self.repeats
        common = {"seed": self.options.seed, **(common or {})}
        variants = [Variant(v.label, {**common, **v.overrides}) for v in variants]
        task = self.progress.add_task(label, total=repeats * len(prompts) * len(variants))
        decode = decoder(engine)
        rows, per_repeat = [], []
        advance = lambda _run: self.progress.advance(task)  # noqa: E731
        for r in range(repeats):
            seed_of = {pid: common["seed"] if seeds is None else seeds(i, r) for i, (pid, _) in enumerate(prompts)}
            if seeds is None:
                runs = run_side_by_side(engine, prompts, variants, warmup=r == 0, on_run=advance)
            else:
                runs = []
                for i, prompt in enumerate(prompts):
                    seeded = [Variant(v.label, {**v.overrides, "seed": seed_of[prompt[0]]}) for v in variants]
                    runs += run_side_by_side(engine, [prompt], seeded, warmup=r == 0 and i == 0, on_run=advance)
            rows += [{**run_record(run, r, decode), "seed": seed_of[run.prompt_id]} for run in runs]
            per_repeat.append(summarise(runs, baseline))
        self.progress.remove_task(task)
        measured = {
            "baseline": baseline, "repeats": repeats,
            "variants": [{"label": v.label, "overrides": v.overrides} for v in variants],
            "runs": rows, "per_repeat": [[dataclasses.asdict(s) for s in rep] for rep in per_repeat],
            "summary": spread(per_repeat),
        }
        if self.checkpoint is not None:
            self.checkpoint(label, measured)
        return measured


def _random_prompt(gen: torch.Generator) -> list[int]:
    """A tiny model's prompt: ``TINY_PROMPT_LEN`` random token ids below ``TINY_PROMPT_ID_LIMIT``."""
    return torch.randint(0, TINY_PROMPT_ID_LIMIT, (TINY_PROMPT_LEN,), generator=gen).tolist()  # [len]


def decoder(engine: SpecMesh) -> Callable | None:
    tok = engine.tokenizer
    return (lambda ids: tok.decode(ids, skip_special_tokens=True)) if tok is not None else None


def config_dict(engine: SpecMesh) -> dict:
    """The engine's configuration, for the results file (read-only mappings become plain dicts)."""
    out = {}
    for f in dataclasses.fields(engine.config):
        value = getattr(engine.config, f.name)
        out[f.name] = dict(value) if isinstance(value, Mapping) else value
    return out
