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
from specmesh.runtime.tree import TokenTree, verify_tree_exact, verify_tree_greedy
from specmesh.runtime.verify import Verdict, verify_exact, verify_greedy

from .registry import Registry

# (candidates as a tree, draft_q (g rows), target_probs [g + 1, V], params, generator) -> Verdict
# (a TreeVerdict, with ``path``, for a tree). Row 0 of p follows the last context token, row 1 + i
# follows candidate i.
AcceptancePolicy = Callable[[TokenTree, SparseDist, torch.Tensor, SamplingParams, torch.Generator], Verdict]
ACCEPTANCE: Registry[AcceptancePolicy] = Registry("acceptance policy")

LOSSLESS = {"exact"}


@ACCEPTANCE.register("exact")
def _exact(
    tree: TokenTree, draft_q: SparseDist, target_probs: torch.Tensor,
    params: SamplingParams, generator: torch.Generator,
) -> Verdict:
    """Lossless: greedy at temperature 0, exact (multi-candidate) rejection sampling otherwise."""
    if tree.is_chain:
        if params.temperature == 0:
            return verify_greedy(tree.tokens, target_probs)
        return verify_exact(tree.tokens, draft_q, target_probs, generator)
    if params.temperature == 0:
        return verify_tree_greedy(tree, target_probs)
    return verify_tree_exact(tree, draft_q, target_probs, generator)
