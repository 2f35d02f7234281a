"""What ``specmesh bench`` runs: the scenarios, the model sets, the grid each sweeps, the options.

Plain frozen data, imported by the runner, the scenarios and the suite alike (nothing here runs).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from typing import Callable, TypeVar

from specmesh.policies.catalog import ACCEPTANCE
from specmesh.policies.draft_length import DRAFT_LENGTH
from specmesh.runtime.config import DEFAULT_DRAFT, DEFAULT_TARGET, DTYPES

from .prompts import DEFAULT_HUMANEVAL

SCENARIOS = ("latency", "gamma", "sparsifier", "hf", "quality", "lengths", "llamacpp")  # run (and reported) in this order
# Temperature of a scenario when --temperature is not given: the sparsifier samples (greedy q is
# one-hot, every sparsifier would accept alike); quality and lengths are greedy. --temperature sets
# these three; latency, gamma and hf are always greedy.
DEFAULT_TEMPERATURE = {"sparsifier": 1.0, "quality": 0.0, "lengths": 0.0}
SAMPLED = tuple(DEFAULT_TEMPERATURE)  # the scenarios --temperature applies to
ADAPTIVE_LENGTHS = ("heuristic", "confidence", "tkslt", "online")  # the lengths scenario's adaptive policies
T = TypeVar("T")
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
    lengths_gammas: tuple[int, ...] = (1, 2, 4, 6, 8)  # lengths: the static gammas swept
    lengths_adaptive: tuple[str, ...] = ADAPTIVE_LENGTHS  # lengths: the adaptive policies run beside them
    lengths_latencies_ms: tuple[float, ...] = (0.0, 50.0)  # lengths: per-hop latencies, one engine each
    lengths_stages: int = 1  # lengths: target stages (in process, no overlap: a round is sequential)
    lengths_start_gamma: int = 4  # lengths: the adaptive policies' first gamma (the engine's default)


_FULL_SWEEP = dict(latencies_ms=(0, 5, 20, 50, 100), stage_counts=(1, 2, 4), sparse_ks=(1, 4, 16, 64),
                   sparse_masses=(0.9, 0.95, 0.99), gammas=(1, 2, 4, 6, 8),
                   draft_lengths=("fixed", "heuristic"))
GRIDS = {  # (models, quick) -> grid
    # (tiny models have no tokenizer: quality is skipped there; its token count serves a tiny pair
    # given a tokenizer, as the tests do)
    ("tiny", False): Grid(**_FULL_SWEEP, repeats=3, prompts={"latency": 2, "lengths": 2},
                          lengths_latencies_ms=(0.0, 20.0),
                          tokens={"latency": 32, "gamma": 48, "sparsifier": 48, "hf": 64, "quality": 32,
                                  "lengths": 48, "llamacpp": 64}),
    ("tiny", True): Grid(latencies_ms=(0, 20), stage_counts=(1, 2), sparse_ks=(4, 16), sparse_masses=(0.9,),
                         gammas=(2, 4), draft_lengths=("fixed", "heuristic"), repeats=2,
                         prompts={"latency": 1, "gamma": 1, "sparsifier": 1, "hf": 2, "lengths": 1},
                         lengths_gammas=(1, 2, 4), lengths_latencies_ms=(0.0, 5.0),
                         tokens={"latency": 16, "gamma": 16, "sparsifier": 16, "hf": 16, "quality": 16,
                                 "lengths": 16, "llamacpp": 16}),
    # The real pair: a 1.5B decode step is ~200 ms on 2 cores, so the distributed grids are reduced.
    ("bundled", False): Grid(**{**_FULL_SWEEP, "latencies_ms": (0, 20, 50), "stage_counts": (1, 2)},
                             repeats=1, prompts={"latency": 1, "gamma": 1, "sparsifier": 2},
                             # lengths: ~30 rounds a run at gamma 4, so that the adaptive policies settle
                             tokens={"latency": 48, "gamma": 48, "sparsifier": 48, "hf": 128, "quality": 256,
                                     "lengths": 128, "llamacpp": 64}),
    ("bundled", True): Grid(latencies_ms=(0, 50), stage_counts=(2,), sparse_ks=(16,), sparse_masses=(0.95,),
                            gammas=(4,), draft_lengths=("fixed",), repeats=1,
                            prompts={"latency": 1, "gamma": 1, "sparsifier": 1, "hf": 1, "quality": 1,
                                     "lengths": 1},
                            lengths_gammas=(2, 4, 6), lengths_adaptive=("tkslt", "online"),
                            tokens={"latency": 24, "gamma": 24, "sparsifier": 24, "hf": 32, "quality": 128,
                                    "lengths": 48, "llamacpp": 32}),
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
        temperature: sampling temperature of ``sparsifier``, ``quality`` and ``lengths`` (None:
            ``DEFAULT_TEMPERATURE``: 1.0 for ``sparsifier``, whose q is one-hot at 0, greedy for the
            others); ``latency``, ``gamma`` and ``hf`` stay greedy (they check outputs against
            target-only's). ``quality`` and ``lengths`` seed every problem on its own
            (:func:`problem_seed`), so a sampled run repeats.
        policies: ``quality``'s acceptance policies, in order (None: ``exact`` and every lossy one).
        strengths: ``quality``: one ``importance`` variant per ``importance_strength`` (empty: one
            variant at the policy's default strength).
        baseline: ``quality`` runs target-only beside SpecMesh (its speedup column); False saves the
            slowest runs.
        latencies_ms: per-hop latencies of ``latency`` and ``lengths`` (None: the grid's).
        gammas: the static gammas of ``gamma`` and ``lengths`` (None: the grid's); ``quality``: one
            value, the gamma of every variant (None: the engine's).
        adaptive: ``lengths``'s adaptive draft-length policies (None: the grid's).
        warmup_problems: ``lengths``: HumanEval problems (tiny models: random prompts of a seeded
            stream of their own) every adaptive policy serves, unmeasured, before the measured ones,
            at each latency: an engine that has served earlier requests on the same links (it is
            not told them; it carries what it learnt, ``policies.draft_length.resume``). Empty: the
            adaptive policies start cold on the first measured prompt. Must not overlap
            ``problems``.
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
    temperature: float | None = None
    policies: tuple[str, ...] | None = None
    strengths: tuple[float, ...] = ()
    baseline: bool = True
    latencies_ms: tuple[float, ...] | None = None
    gammas: tuple[int, ...] | None = None
    adaptive: tuple[str, ...] | None = None
    warmup_problems: tuple[int, ...] = ()
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
        if self.temperature is not None and not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature = {self.temperature}: must be >= 0")
        self._check_policies()
        if not self.bandwidth_mbps > 0:
            raise ValueError(f"bandwidth_mbps = {self.bandwidth_mbps}: must be > 0 (inf = unlimited)")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype = {self.dtype!r}: choose from {', '.join(DTYPES)}")
        if not self.problems:
            raise ValueError("problems: give at least one HumanEval index")
        shared = sorted(set(self.warmup_problems) & set(self.problems))
        if shared:
            raise ValueError(f"warmup_problems {shared} are also measured problems: a policy would be "
                             "measured on what it learnt from; give other indices")
        if any(not 0 <= i for i in self.warmup_problems):
            raise ValueError(f"warmup_problems {list(self.warmup_problems)}: give indices >= 0")

    def _check_policies(self) -> None:
        known = ACCEPTANCE.names()
        bad = [p for p in self.policies or () if p not in known]
        if bad or self.policies == ():
            raise ValueError(f"policies {bad or '(none)'}: choose from {', '.join(known)}")
        if len(set(self.policies or ())) != len(self.policies or ()):
            raise ValueError(f"policies {list(self.policies)}: each at most once")
        bad_s = [s for s in self.strengths if not 0 <= s <= 1]
        if bad_s:
            raise ValueError(f"strengths {bad_s}: importance_strength must be in [0, 1]")
        if self.strengths and "importance" not in (self.policies or known):
            raise ValueError(f"strengths {list(self.strengths)} need the importance policy in policies")
        adaptive = [p for p in DRAFT_LENGTH.names() if p != "fixed"]
        bad = [p for p in self.adaptive or () if p not in adaptive]
        if bad or self.adaptive == ():
            raise ValueError(f"adaptive {bad or '(none)'}: choose from {', '.join(adaptive)}")
        if any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in self.gammas or ()) \
                or self.gammas == ():
            raise ValueError(f"gammas {self.gammas}: give integers >= 1")
        if any(not 0 <= lat < math.inf for lat in self.latencies_ms or ()) or self.latencies_ms == ():
            raise ValueError(f"latencies_ms {self.latencies_ms}: give finite values >= 0")

    @property
    def grid(self) -> Grid:
        """The scenario grid of these models, with the sweeps given on the command line put in."""
        grid = GRIDS[(self.models, self.quick)]
        changes = {}
        if self.latencies_ms is not None:
            changes.update(latencies_ms=self.latencies_ms, lengths_latencies_ms=self.latencies_ms)
        if self.gammas is not None:
            changes.update(gammas=self.gammas, lengths_gammas=self.gammas)
        if self.adaptive is not None:
            changes.update(lengths_adaptive=self.adaptive)
        return dataclasses.replace(grid, **changes) if changes else grid

    def temperature_of(self, scenario: str) -> float:
        """The sampling temperature ``scenario`` runs at."""
        if scenario not in SAMPLED:
            return 0.0
        return DEFAULT_TEMPERATURE[scenario] if self.temperature is None else self.temperature

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
        for name, flag in (("policies", "--policies"), ("strengths", "--strengths"),
                           ("latencies_ms", "--latencies"), ("gammas", "--gammas"), ("adaptive", "--adaptive"),
                           ("warmup_problems", "--warmup-problems")):
            value = getattr(self, name)
            if value:
                parts.append(f"{flag} {','.join(v if isinstance(v, str) else format(v, 'g') for v in value)}")
        parts += [] if self.baseline else ["--no-baseline"]
        return " ".join(parts)


def problem_seed(seed: int, index: int, repeat: int = 0) -> int:
    """The seed of one problem's runs (every variant alike, so they meet the same draws where they
    agree): a hash of the run's seed, the problem's index and the repetition, below 2**31."""
    digest = hashlib.blake2b(f"{seed}/{index}/{repeat}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF


def split_list(flag: str, text: str, convert: Callable[[str], T]) -> tuple[T, ...]:
    """``"a,b,c"`` converted item by item; ValueError naming ``flag`` and the value otherwise."""
    try:
        return tuple(convert(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        raise ValueError(f"{flag} = {text!r}: must be a comma-separated list, e.g. "
                         f"{'0,50' if convert is float else '1,2,4' if convert is int else 'a,b'}") from None
