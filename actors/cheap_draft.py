"""A cheaper draft, lossless under exact verification: the target checks whatever the draft proposes
against the q it really sampled from, so the draft may be any model over the same vocabulary.

Two economies, each measured (``benchmarks/draft_cost.py``):

- ``weights``: the draft's linear layers in a low-bit format (``actors/lowbit.py``; default
  ``auto``: on an AVX512 EPYC int4 weight-only, the fastest for one token at a time). Every format
  computes each row on its own (int8 quantises activations per row), so the draft batches across
  sessions.
- ``head_rows=N``: the LM head computes logits for token ids ``< N`` only (byte-level BPE ids are
  ordered by merge rank, so the first ids are the most frequent pieces); the draft then samples only
  within that set, which its sparse q already expresses (q = 0 elsewhere). Saves ``1 - N/V`` of the
  head.
"""
from __future__ import annotations

import torch

from . import lowbit
from .hf import StageModel


class _RestrictedHead(torch.nn.Module):
    """Logits for the first ``rows`` token ids; ``-inf`` for the others (probability 0)."""

    def __init__(self, head: torch.nn.Module, rows: int, vocab: int) -> None:
        super().__init__()
        weight = head.weight.detach()[:rows].clone()  # [rows, hidden] (a copy: the head may be tied)
        self.inner = torch.nn.Linear(weight.shape[1], rows, bias=False, dtype=weight.dtype)
        self.inner.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.vocab = vocab

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        part = self.inner(hidden)  # [..., rows]
        out = part.new_full((*part.shape[:-1], self.vocab), float("-inf"))  # [..., vocab]
        out[..., : part.shape[-1]] = part
        return out


def make_cheaper(stage: StageModel, weights: str = "auto", head_rows: int = 0,
                 dtype: torch.dtype | None = None) -> StageModel:
    """Applies the chosen economies to a loaded draft in place and returns it.

    Args:
        stage: the draft (one stage holding every layer).
        weights: the linear layers' format, one of :data:`lowbit.FORMATS`.
        head_rows: 0 = the full LM head; N = logits for ids ``< N`` only (1 <= N <= vocab).
        dtype: the dtype it computes in (None: the model's as loaded).
    """
    lowbit.check_format(weights, "draft weights")
    if not 0 <= head_rows <= stage.vocab_size:
        raise ValueError(f"draft head_rows must be in [0, {stage.vocab_size}] (0 = all), got {head_rows}")
    module = stage.module
    if head_rows and head_rows < stage.vocab_size:
        module.lm_head = _RestrictedHead(module.lm_head, head_rows, stage.vocab_size)
    stage.formats = lowbit.apply(module, weights, lowbit.DRAFT_WORK, dtype)
    return stage
