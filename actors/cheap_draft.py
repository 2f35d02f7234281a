"""A cheaper draft, lossless under exact verification: the target checks whatever the draft proposes
against the q it really sampled from, so the draft may be any model over the same vocabulary.

Two opt-outs of the full-precision draft, each measured (``benchmarks/draft_cost.py``):

- ``quant="int8"``: dynamic int8 quantisation of every linear layer (weights int8, activations
  quantised per call; torch's fbgemm/oneDNN kernels). On the bundled 0.5B draft, one thread of an
  AMD EPYC with AVX512-BF16: ~50 ms per token against ~120 in bf16 and ~160 in fp32.
- ``head_rows=N``: the LM head computes logits for token ids ``< N`` only (byte-level BPE ids are
  ordered by merge rank, so the first ids are the most frequent pieces); the draft then samples only
  within that set, which its sparse q already expresses (q = 0 elsewhere). Saves ``1 - N/V`` of the
  head, a quarter of a 0.5B draft's work.
"""
from __future__ import annotations

import warnings

import torch

from . import cpu_linear
from .hf import StageModel

QUANTS = ("none", "int8")


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


def make_cheaper(stage: StageModel, quant: str = "none", head_rows: int = 0) -> StageModel:
    """Applies the chosen economies to a loaded draft in place and returns it.

    Args:
        stage: the draft (one stage holding every layer).
        quant: "none" or "int8" (dynamic int8 linear layers; the draft then computes in fp32
            elsewhere).
        head_rows: 0 = the full LM head; N = logits for ids ``< N`` only (1 <= N <= vocab).
    """
    if quant not in QUANTS:
        raise ValueError(f"draft quantisation must be one of {QUANTS}, got {quant!r}")
    if not 0 <= head_rows <= stage.vocab_size:
        raise ValueError(f"draft head_rows must be in [0, {stage.vocab_size}] (0 = all), got {head_rows}")
    module = stage.module
    if head_rows and head_rows < stage.vocab_size:
        module.lm_head = _RestrictedHead(module.lm_head, head_rows, stage.vocab_size)
    if quant == "int8":
        module.float()
        with warnings.catch_warnings():  # torch 2.13 points to torchao; the eager API still works
            warnings.simplefilter("ignore")
            stage.module = torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)
        # Activations are quantised with one scale per forward: a token's logits depend on what is
        # fed beside it (max difference ~1 logit on the tiny models), so the draft feeds tokens in a
        # fixed way to stay a pure function of the context (actors/draft.py).
        stage.row_independent = False
    else:
        cpu_linear.use_onednn(module)  # float32 on CPUs whose BLAS is slow at few rows (not before int8: it needs nn.Linear)
    return stage
