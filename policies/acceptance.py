"""Acceptance policies: how the verifier decides which draft tokens to keep.

``exact`` is lossless: greedy verification at temperature 0, exact speculative sampling otherwise.
Lossy rules (typical acceptance, FLy, DSD's adaptive thresholds) register here under their own
names; they never hide behind a flag on the exact one.
"""
from __future__ import annotations

from typing import Callable

import torch

from specmesh.runtime.messages import SamplingParams
from specmesh.runtime.sparse import SparseDist
from specmesh.runtime.verify import Verdict, verify_exact, verify_greedy

from .registry import Registry

# (draft_tokens [g], draft_q (g rows), target_probs [g + 1, V], params, generator) -> Verdict
AcceptancePolicy = Callable[[torch.Tensor, SparseDist, torch.Tensor, SamplingParams, torch.Generator], Verdict]
ACCEPTANCE: Registry[AcceptancePolicy] = Registry("acceptance policy")

LOSSLESS = {"exact"}


@ACCEPTANCE.register("exact")
def _exact(
    draft_tokens: torch.Tensor, draft_q: SparseDist, target_probs: torch.Tensor,
    params: SamplingParams, generator: torch.Generator,
) -> Verdict:
    if params.temperature == 0:
        return verify_greedy(draft_tokens, target_probs)
    return verify_exact(draft_tokens, draft_q, target_probs, generator)
