"""The programmatic Python API: build an engine from a :class:`SpecConfig`, generate, stream.

    from specmesh.runtime import SpecConfig, SpecMesh
    with SpecMesh(SpecConfig(target="tiny", draft="tiny-draft", dtype="float32")) as engine:
        result = engine.generate([1, 2, 3], max_new_tokens=32)

Backends are found by name and imported lazily, so that this module (and the runtime) never imports
Ray or the model-loading code itself.
"""
from __future__ import annotations

import dataclasses
import importlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

from specmesh.policies.draft_length import resume

from .config import SpecConfig
from .interfaces import Backend
from .lockstep import RoundGate
from .scheduler import Generation, GenerationError  # noqa: F401  (part of the API)
from .stop import StopRule
from .stats import SessionStats

# Fields that decide which workers exist: they cannot change per call.
# timeout_s too: the deadline of every remote wait is part of the built pipeline.
_BUILD_FIELDS = ("target", "num_stages", "dtype", "backend", "threads", "cache_dir", "topology", "timeout_s",
                "hop_timeout_s", "weights", "draft_weights", "draft_head_rows", "batch_sessions", "lockstep",
                "federated_workers", "federated_weights", "federated_k", "federated_strategy")

# backend name -> "module:function" building a Backend from a SpecConfig.
_BACKEND_BUILDERS = {
    "inproc": "specmesh.cluster.inproc:build",
    "local": "specmesh.cluster.ray_backend:build_local",
    "cluster": "specmesh.cluster.ray_backend:build_cluster",
    "federated": "specmesh.cluster.federated:build_federated",  # SpecFed, in process (federated_workers)
    "federated-ray": "specmesh.cluster.federated_ray:build_federated_ray",  # SpecFed on local / cluster
}


def build_backend(config: SpecConfig) -> Backend:
    """Builds the workers named by ``config.backend`` (loading models)."""
    fed = "federated" if config.backend == "inproc" else "federated-ray"
    module, _, func = _BACKEND_BUILDERS[fed if config.federated_workers else config.backend].partition(":")
    return getattr(importlib.import_module(module), func)(config)


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation.

    Attributes:
        prompt_ids / output_ids: token ids.
        text: decoded output (None without a tokenizer).
        finish_reason: "eos", "stop", "length" or "context".
        stats: counters, timings and bytes.
    """

    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None
    finish_reason: str
    stats: SessionStats


@dataclass(frozen=True)
class StreamChunk:
    """New tokens of one round (and their text when a tokenizer is known)."""

    token_ids: list[int]
    text: str | None


class SpecMesh:
    """A loaded engine: draft and target workers wired by the configured backend.

    Args:
        config: the engine configuration.
        backend: an already built backend (tests, custom wiring); built from ``config`` if None.
    """

    def __init__(self, config: SpecConfig, backend: Backend | None = None) -> None:
        self.config = config
        self.backend = backend if backend is not None else build_backend(config)
        # Per adaptive draft-length policy (with its options and sampling), the policy and gamma the
        # engine's last session of it ended with: the next session resumes there (policies.draft_length.resume).
        self._warm: dict[tuple, tuple] = {}
        # Concurrent sessions start their rounds together, so that batched forwards serve them all.
        self.gate = RoundGate() if config.batch_sessions > 1 and config.lockstep else None

    @property
    def tokenizer(self):
        return self.backend.tokenizer

    def generation(
        self, prompt: str | Sequence[int], session_id: str | None = None, **overrides
    ) -> Generation:
        """A not-yet-started generation; ``overrides`` replace config fields for this call only
        (e.g. ``max_new_tokens``, ``temperature``, ``seed``, ``gamma``, ``stop``)."""
        fixed = sorted(k for k in _BUILD_FIELDS if k in overrides and overrides[k] != getattr(self.config, k))
        if fixed or overrides.get("draft") not in (None, self.config.draft):
            raise ValueError(
                f"{fixed or ['draft']} are fixed when the engine is built (only draft=None, for "
                "target-only, may change per call); build another SpecMesh for other workers"
            )
        cfg = dataclasses.replace(self.config, **overrides) if overrides else self.config
        drafter_missing = cfg.draft is not None and self.backend.drafter is None
        if drafter_missing:
            raise ValueError("this engine was built without a draft; set draft=None")
        ids = self._encode(prompt)
        tok = self.backend.tokenizer
        stop = StopRule(
            max_new_tokens=cfg.max_new_tokens,
            eos_token_ids=self.backend.info.eos_token_ids,
            stop_strings=tuple(cfg.stop),
            decode=(lambda t: tok.decode(t, skip_special_tokens=True)) if tok is not None else None,
        )
        backend = self.backend if cfg.draft is not None else dataclasses.replace(self.backend, drafter=None)
        adaptive = cfg.draft is not None and cfg.draft_length != "fixed"
        key = (tuple(sorted(cfg.policy_map().items())), cfg.temperature, cfg.top_k, cfg.top_p)
        policy, gamma = cfg.draft_length_policy(), cfg.gamma
        if adaptive and "gamma" not in overrides and key in self._warm:
            policy, gamma = resume(*self._warm[key])

        def remember(gen: Generation) -> None:
            if gen.session.round > 1:  # a session of one round (the prefill) learned nothing
                self._warm[key] = (gen.draft_length, gen.session.gamma)

        return Generation(
            backend, ids, cfg.sampling_params(), cfg.policy_map(), stop, policy,
            gamma, session_id, cfg.tree_width, self._overlap(cfg), on_finish=remember if adaptive else None,
            gate=self.gate,
        )

    def forget_draft_lengths(self) -> None:
        """Sessions start their adaptive draft-length policies afresh (at ``config.gamma``) again."""
        self._warm.clear()

    def _overlap(self, cfg: SpecConfig) -> bool:
        """Overlap as configured; by default on where the backend says the draft has cores of its own."""
        if cfg.overlap is not None:
            return cfg.overlap
        return self.backend.draft_cores_disjoint

    def generate(self, prompt: str | Sequence[int], **overrides) -> GenerationResult:
        """Generates to the end; see :meth:`generation` for ``overrides``.

        Raises:
            GenerationError: a round failed; its ``output_ids`` hold every token committed before.
        """
        gen = self.generation(prompt, **overrides)
        gen.run()
        return GenerationResult(
            gen.prompt, gen.output_ids, self._decode(gen.output_ids), gen.finish_reason, gen.stats
        )

    def generate_many(
        self, prompts: Sequence[str | Sequence[int]], concurrency: int | None = None, **overrides
    ) -> list[GenerationResult]:
        """Generates for several prompts as concurrent sessions, results in prompt order.

        On the Ray backends the sessions' rounds pipeline through the stages (stage k works on one
        session's round while stage k+1 works on another's); in process they simply interleave.

        Args:
            prompts: one prompt per session.
            concurrency: sessions in flight at once (default: all).
        """
        if not prompts:
            return []
        workers = max(1, min(concurrency or len(prompts), len(prompts)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="specmesh-session") as pool:
            return list(pool.map(lambda p: self.generate(p, **overrides), prompts))

    def stream(self, prompt: str | Sequence[int], **overrides) -> Iterator[StreamChunk]:
        """Yields each round's new tokens as soon as they are committed."""
        for new in self.generation(prompt, **overrides):
            yield StreamChunk(new, self._decode(new))

    def close(self) -> None:
        """Stops every worker and releases their resources."""
        self.backend.close()

    def __enter__(self) -> "SpecMesh":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.backend.tokenizer is None:
                raise TypeError("this model has no tokenizer: give the prompt as token ids")
            return list(self.backend.tokenizer.encode(prompt))
        return [int(t) for t in prompt]

    def _decode(self, ids: list[int]) -> str | None:
        tok = self.backend.tokenizer
        return tok.decode(ids, skip_special_tokens=True) if tok is not None else None


def generate(prompt: str | Sequence[int], config: SpecConfig | None = None, **overrides) -> GenerationResult:
    """One-shot helper: builds an engine, generates, and closes it."""
    with SpecMesh(config or SpecConfig()) as engine:
        return engine.generate(prompt, **overrides)
