"""The user's configuration of a SpecMesh engine: one frozen, validated dataclass."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from specmesh.policies.catalog import make_draft_length, make_rule
from specmesh.policies.sparsify import make_sparsifier
from specmesh.policies.split import verification_mode
from specmesh.policies.federated import federated_settings

from .messages import SamplingParams
from .schema import POLICY_KEY_PATTERN

PolicyValue = str | int | float | bool
# Keys of the policy map that SpecConfig fields set; policy_options may not repeat them.
_FIELD_POLICY_KEYS = ("acceptance", "sparsifier", "sparse_k", "sparse_mass", "draft_length", "verification")
_KNOB_NAME = re.compile(POLICY_KEY_PATTERN)  # the wire's rule for the keys of the policy map

BACKENDS = ("inproc", "local", "cluster")
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Weight formats of a worker's linear layers (``actors/lowbit.py``): auto (measured at load time per
#: layer shape), dense (the model dtype), int8 (per-channel weights, activations per row), int4 (groups of 32).
WEIGHT_FORMATS = ("auto", "dense", "int8", "int4")
DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"


@dataclass(frozen=True)
class SpecConfig:
    """Everything that defines a SpecMesh engine.

    Attributes:
        target: target model: a bundled name, a local HF directory, an HF id, or ``tiny[:...]``.
        draft: draft model (same forms), or None for target-only decoding (the baseline).
        num_stages: pipeline stages the target is split into (1..num_layers).
        gamma: draft depth per round (the starting value for adaptive draft-length policies).
        tree_width: candidates per depth: 1 = a chain; c > 1 = a token tree of c siblings per depth
            (sampled without replacement; the first is extended), verified all at once (DSD).
        draft_length: draft-length policy name ("fixed", "heuristic").
        temperature: 0 = greedy; > 0 samples.
        top_k: user top-k warper on p and q (0 = off).
        top_p: user top-p warper on p and q, in (0, 1] (1 = off).
        sparsifier: how q is truncated for the uplink ("top-k", "top-p", "dense").
        sparse_k: entries per position for "top-k" (and the cap for "top-p").
        sparse_mass: probability mass kept by "top-p", in (0, 1].
        acceptance: acceptance policy name ("exact" is lossless; others are lossy and opt-in).
        verification: where verification runs: "target" (the last stage, against the q rows the
            uplink carried) or "split" (DSSD: the uplink carries q(x) per candidate only, the last
            stage runs the accept tests, the device draws the correction; lossless; chains only).
        policy_options: further named knobs of the policies (e.g. ``{"importance_strength": 0.5}``),
            sent to every worker in the session's policy map; each policy validates the keys it reads.
        max_new_tokens: generation length limit.
        stop: strings that end generation (needs a tokenizer).
        seed: root of every random draw; a seeded run repeats exactly.
        dtype: model dtype; "auto" = bf16 where the hardware computes in bf16, else float32.
        weights: the target stages' weight format (``actors/lowbit.py``): "auto" (default: per layer
            shape, the fastest of int8 / int4 / dense at the rows a stage runs, measured at load
            time), "dense" (the model dtype), "int8" (int8 weights per channel, activations
            quantised per row; rows stay independent bit for bit) or "int4" (weight-only, groups of
            32). Exact relative to the target *as it runs*: verification and target-only decoding
            compute the same function of the same weights.
        draft_weights: the draft's weight format (same choices, default "auto"); any draft format is
            lossless (exact verification checks the q actually sampled).
        draft_head_rows: 0 = the draft's full LM head; N = logits for token ids < N only (the most
            frequent BPE pieces), a cheaper head; lossless as above.
        backend: "inproc" (one process), "local" (Ray on this machine), "cluster" (a Ray cluster).
        threads: torch threads per worker (None: the process default).
        cache_dir: model cache directory (None: $SPECMESH_CACHE or the user cache dir).
        topology: a topology file for the Ray backends (nodes, links, stage placement).
        overlap: draft the next round while this one is verified (None: on exactly where the
            backend says the draft computes on cores no stage uses: separate machines, or a
            topology that gives the device its own cores, as the shipped one-machine files do).
        timeout_s: deadline of every remote wait of a round on the Ray backends.
        batch_sessions: most concurrent sessions whose rounds a target stage verifies in one
            forward (batched rounds across sessions); 1 = off (each round its own forward).
        lockstep: with ``batch_sessions > 1``, concurrent sessions start their rounds together
            (``runtime/lockstep.py``), so that each worker's forward serves all of them instead of
            the two or three that drifted in at the same moment; False lets them run freely.
        hop_timeout_s: deadline of each hop of a round on the Ray backends (a message reaching the
            next worker and that worker's answer), counted from the previous hop's answer; a hop
            that misses it fails its receiver by name, long before ``timeout_s`` (None: no per-hop
            deadline, only the round's).
        federated_workers / federated_weights / federated_k / federated_strategy: SpecFed
            (``cluster/federated.py``; on Ray ``cluster/federated_ray.py``): M target workers verify
            every round, each sends its top-K p per position, the device verifies against their
            weighted average (see the fields).
    """

    target: str = DEFAULT_TARGET
    draft: str | None = DEFAULT_DRAFT
    num_stages: int = 2
    gamma: int = 4
    tree_width: int = 1
    draft_length: str = "fixed"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    sparsifier: str = "top-k"
    sparse_k: int = 16
    sparse_mass: float = 0.95
    acceptance: str = "exact"
    verification: str = "target"
    policy_options: Mapping[str, PolicyValue] = field(default_factory=dict)
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int = 0
    dtype: str = "auto"
    weights: str = "auto"
    draft_weights: str = "auto"
    draft_head_rows: int = 0
    backend: str = "inproc"
    threads: int | None = None
    cache_dir: str | None = None
    topology: str | None = None
    overlap: bool | None = None
    timeout_s: float = 300.0
    batch_sessions: int = 16
    lockstep: bool = True
    hop_timeout_s: float | None = None
    federated_workers: tuple[str, ...] = ()  # SpecFed: one target model per worker (empty: off)
    federated_weights: tuple[float, ...] = ()  # one weight per worker, normalised (empty: equal)
    federated_k: int = 0  # top-K entries each worker sends per position (0: dense, every token)
    federated_strategy: str = "zero"  # reconstruction: zero, spread-uniform, spread-q

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target model must be named")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        if self.tree_width < 1:
            raise ValueError(f"tree_width must be >= 1, got {self.tree_width}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.sparse_k < 1:
            raise ValueError(f"sparse_k must be >= 1, got {self.sparse_k}")
        if not 0 < self.sparse_mass <= 1:
            raise ValueError(f"sparse_mass must be in (0, 1], got {self.sparse_mass}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.hop_timeout_s is not None and not 0 < self.hop_timeout_s <= self.timeout_s:
            raise ValueError(f"hop_timeout_s must be None or in (0, timeout_s = {self.timeout_s:g}], "
                             f"got {self.hop_timeout_s}")
        if isinstance(self.batch_sessions, bool) or not isinstance(self.batch_sessions, int) \
                or self.batch_sessions < 1:
            raise ValueError(f"batch_sessions must be an integer >= 1 (1 = off), got {self.batch_sessions!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("weights", "draft_weights"):
            if getattr(self, name) not in WEIGHT_FORMATS:
                raise ValueError(f"{name} must be one of {', '.join(WEIGHT_FORMATS)}, got {getattr(self, name)!r}")
        if isinstance(self.draft_head_rows, bool) or not isinstance(self.draft_head_rows, int) \
                or self.draft_head_rows < 0:
            raise ValueError(f"draft_head_rows must be an integer >= 0 (0 = all), got {self.draft_head_rows!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.stop, str):
            raise TypeError(f"stop must be a tuple of strings, got the string {self.stop!r}")
        self._check_policy_options()
        object.__setattr__(self, "policy_options", MappingProxyType(dict(self.policy_options)))
        policy = self.policy_map()
        make_sparsifier(policy)
        rule = make_rule(policy, None)
        if verification_mode(policy) == "split" and self.tree_width > 1:
            raise ValueError(f"verification 'split' verifies chains only (a tree's recursive rejection "
                             f"needs every sibling's q row at the edge); tree_width must be 1, got {self.tree_width}")
        if self.tree_width > 1 and rule.chain_only:
            raise ValueError(
                f"acceptance {self.acceptance!r} verifies chains only; tree_width must be 1, "
                f"got {self.tree_width}"
            )
        self.draft_length_policy()
        if self.federated_workers or self.federated_weights:
            self._check_federated()

    def _check_policy_options(self) -> None:
        if not isinstance(self.policy_options, Mapping):
            raise TypeError(f"policy_options must be a mapping of name to value, got {self.policy_options!r}")
        for key, value in self.policy_options.items():
            if key in _FIELD_POLICY_KEYS:
                raise ValueError(f"policy_options[{key!r}]: set it with the SpecConfig field {key} instead")
            if not isinstance(key, str) or not _KNOB_NAME.match(key):
                raise ValueError(f"policy_options key {key!r}: must be a name matching {_KNOB_NAME.pattern} "
                                 "(what the session's policy map carries on the wire)")
            if not isinstance(value, (str, int, float, bool)) or (
                    isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"policy_options[{key!r}] = {value!r}: must be a finite number, bool or string")

    def _check_federated(self) -> None:
        for name in ("federated_workers", "federated_weights"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        federated_settings(self.federated_workers, self.federated_weights, self.federated_k,
                           self.federated_strategy)
        if self.acceptance != "exact" or self.verification != "target":
            raise ValueError(f"federated workers verify with acceptance 'exact' and verification 'target' "
                             f"(the aggregator's); got {self.acceptance!r} and {self.verification!r}")

    def sampling_params(self) -> SamplingParams:
        """The per-session sampling parameters that workers receive."""
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)

    def policy_map(self) -> dict[str, PolicyValue]:
        """The session's named policy map: every policy choice and knob, sent when a session opens."""
        return {
            **self.policy_options, "acceptance": self.acceptance, "sparsifier": self.sparsifier,
            "sparse_k": self.sparse_k, "sparse_mass": self.sparse_mass, "draft_length": self.draft_length,
            "verification": self.verification,
        }

    def draft_length_policy(self):
        """A fresh draft-length policy object for one session."""
        return make_draft_length(self.draft_length, self.gamma, self.policy_map())
