"""What ``specmesh bench`` runs: the scenarios, the model sets, the grid each sweeps, the options.

Plain frozen data, imported by the runner, the scenarios and the suite alike (nothing here runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from specmesh.runtime.config import DEFAULT_DRAFT, DEFAULT_TARGET, DTYPES

from .prompts import DEFAULT_HUMANEVAL

SCENARIOS = ("latency", "gamma", "sparsifier", "hf", "quality")  # run (and reported) in this order
# Noise 0.02 accepts ~45% of greedy drafts on random prompts (mean accepted length ~2.7 at gamma 4),
# the regime of a real pair; the default tiny-draft (noise 0.05) is built to be wrong for tests.
TINY_DRAFT = "tiny-draft:noise=0.02"


@dataclass(frozen=True)
class ModelSet:
    """A draft/target pair and how it runs on CPU."""

    target: str
    draft: str
    dtype: str  # float32 for tiny models (exact greedy equality); "auto" (bf16 only where native) for real
    threads: int  # default torch threads (1 for tiny: thread spin costs more than the math)


MODELS = {
    "tiny": ModelSet("tiny", TINY_DRAFT, "float32", 1),
    "bundled": ModelSet(DEFAULT_TARGET, DEFAULT_DRAFT, "auto", 2),
}


@dataclass(frozen=True)
class Grid:
    """What each scenario sweeps. ``tokens`` and ``prompts`` are per scenario (prompts: how many of the
    prompt list it uses; absent = all)."""

    latencies_ms: tuple[float, ...]
    stage_counts: tuple[int, ...]
    sparse_ks: tuple[int, ...]
    sparse_masses: tuple[float, ...]
    gammas: tuple[int, ...]
    draft_lengths: tuple[str, ...]
    tokens: dict[str, int]
    repeats: int
    prompts: dict[str, int] = field(default_factory=dict)
    gamma_stages: int = 2  # the gamma sweep runs over this pipeline...
    gamma_latency_ms: float = 20.0  # ...with this latency per hop


_FULL_SWEEP = dict(latencies_ms=(0, 5, 20, 50, 100), stage_counts=(1, 2, 4), sparse_ks=(1, 4, 16, 64),
                   sparse_masses=(0.9, 0.95, 0.99), gammas=(1, 2, 4, 6, 8),
                   draft_lengths=("fixed", "heuristic"))
GRIDS = {  # (models, quick) -> grid
    ("tiny", False): Grid(**_FULL_SWEEP, repeats=3, prompts={"latency": 2},
                          tokens={"latency": 32, "gamma": 48, "sparsifier": 48, "hf": 64, "quality": 0}),
    ("tiny", True): Grid(latencies_ms=(0, 20), stage_counts=(1, 2), sparse_ks=(4, 16), sparse_masses=(0.9,),
                         gammas=(2, 4), draft_lengths=("fixed", "heuristic"), repeats=2,
                         prompts={"latency": 1, "gamma": 1, "sparsifier": 1, "hf": 2},
                         tokens={"latency": 16, "gamma": 16, "sparsifier": 16, "hf": 16, "quality": 0}),
    # The real pair: a 1.5B decode step is ~200 ms on 2 cores, so the distributed grids are reduced.
    ("bundled", False): Grid(**{**_FULL_SWEEP, "latencies_ms": (0, 20, 50), "stage_counts": (1, 2)},
                             repeats=1, prompts={"latency": 1, "gamma": 1, "sparsifier": 2},
                             tokens={"latency": 48, "gamma": 48, "sparsifier": 48, "hf": 128, "quality": 256}),
    ("bundled", True): Grid(latencies_ms=(0, 50), stage_counts=(2,), sparse_ks=(16,), sparse_masses=(0.95,),
                            gammas=(4,), draft_lengths=("fixed",), repeats=1,
                            prompts={"latency": 1, "gamma": 1, "sparsifier": 1, "hf": 1, "quality": 1},
                            tokens={"latency": 24, "gamma": 24, "sparsifier": 24, "hf": 32, "quality": 128}),
}


@dataclass(frozen=True)
class BenchOptions:
    """What ``specmesh bench`` runs; see ``specmesh bench --help``.

    Attributes:
        out: output directory (results.json, report.md, *.png, topologies/).
        scenarios: scenario names, a subset of ``SCENARIOS``.
        models: "tiny" (random models, seconds) or "bundled" (the real Qwen2.5-Coder pair).
        quick: the reduced grid (CI).
        repeats: repetitions of every measurement (None: the grid's).
        problems: HumanEval problem indices (prompts of the real pair, problems of ``quality``).
        max_new_tokens: tokens per generation in every scenario but ``quality`` (None: the grid's).
        temperature: sampling temperature of the ``sparsifier`` scenario (at 0 q is one-hot and every
            sparsifier accepts alike).
        bandwidth_mbps: bandwidth of every modelled link (inf: latency only).
        seed: seed of every run and of the tiny prompts.
        threads: torch threads (None: the model set's).
        dtype: model dtype for SpecMesh and the transformers peer alike (None: the model set's).
        cache_dir: model cache (None: the default).
        command: the command line to print in the report (None: rebuilt from these options).
    """

    out: Path = Path("bench-out")
    scenarios: tuple[str, ...] = SCENARIOS
    models: str = "tiny"
    quick: bool = False
    repeats: int | None = None
    problems: tuple[int, ...] = DEFAULT_HUMANEVAL
    max_new_tokens: int | None = None
    temperature: float = 1.0
    bandwidth_mbps: float = math.inf
    seed: int = 0
    threads: int | None = None
    dtype: str | None = None
    cache_dir: str | None = None
    command: str | None = None

    def __post_init__(self) -> None:
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad or not self.scenarios:
            raise ValueError(f"scenario {bad or '(none)'}: choose from {', '.join(SCENARIOS)}")
        if self.models not in MODELS:
            raise ValueError(f"models = {self.models!r}: choose from {', '.join(MODELS)}")
        for name in ("repeats", "max_new_tokens", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} = {value}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature = {self.temperature}: must be >= 0")
        if not self.bandwidth_mbps > 0:
            raise ValueError(f"bandwidth_mbps = {self.bandwidth_mbps}: must be > 0 (inf = unlimited)")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype = {self.dtype!r}: choose from {', '.join(DTYPES)}")
        if not self.problems:
            raise ValueError("problems: give at least one HumanEval index")

    @property
    def grid(self) -> Grid:
        return GRIDS[(self.models, self.quick)]

    def command_line(self) -> str:
        if self.command:
            return self.command
        parts = ["specmesh bench", f"--models {self.models}", f"--out {self.out}"]
        parts += ["--quick"] if self.quick else []
        parts += [f"--scenario {s}" for s in self.scenarios] if self.scenarios != SCENARIOS else []
        defaults = BenchOptions()
        for name, flag in (("repeats", "--repeats"), ("max_new_tokens", "--max-new-tokens"),
                           ("temperature", "--temperature"), ("bandwidth_mbps", "--bandwidth-mbps"),
                           ("seed", "--seed"), ("threads", "--threads"), ("dtype", "--dtype")):
            if getattr(self, name) != getattr(defaults, name):
                value = getattr(self, name)
                parts.append(f"{flag} {value if isinstance(value, str) else format(value, 'g')}")
        if self.problems != defaults.problems:
            parts.append(f"--problems {','.join(map(str, self.problems))}")
        return " ".join(parts)
