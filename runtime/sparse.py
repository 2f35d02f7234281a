"""Sparse probability distributions: the truncated q that crosses the uplink (TSLT / TK-SLT).

A :class:`SparseDist` holds, for each of ``n`` positions, ``k`` token ids and their probabilities.
Every entry not listed has probability exactly 0. Rows may be padded: padding entries carry
probability 0 (their index is irrelevant but must be inside the vocabulary).

This module is a leaf: it imports nothing of SpecMesh.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseDist:
    """``n`` sparse distributions over a vocabulary of ``vocab_size`` tokens.

    Attributes:
        indices: token ids, ``int64`` ``[n, k]``.
        probs: probabilities, ``float32`` ``[n, k]``; each row sums to 1, padding entries are 0.
        vocab_size: size of the vocabulary the indices refer to.
    """

    indices: torch.Tensor  # [n, k] int64
    probs: torch.Tensor  # [n, k] float32
    vocab_size: int

    def __post_init__(self) -> None:
        if self.indices.shape != self.probs.shape or self.indices.dim() != 2:
            raise ValueError(
                f"indices {tuple(self.indices.shape)} and probs {tuple(self.probs.shape)} "
                "must both be [n, k]"
            )
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")

    @property
    def num_positions(self) -> int:
        return self.indices.shape[0]

    @property
    def width(self) -> int:
        """Entries stored per row (k), padding included."""
        return self.indices.shape[1]

    def to_dense(self) -> torch.Tensor:
        """Returns the dense probabilities, ``float32`` ``[n, vocab_size]``."""
        dense = torch.zeros(self.num_positions, self.vocab_size, dtype=torch.float32)
        return dense.scatter_add_(1, self.indices, self.probs.float())

    def prob_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Probability of ``token_ids[i]`` under row ``i``; 0 where the token is not listed.

        Args:
            token_ids: ``[n]`` int64.
        Returns:
            ``[n]`` float32.
        """
        hit = self.indices == token_ids.view(-1, 1)  # [n, k]
        return (self.probs.float() * hit).sum(dim=1)

    def row(self, i: int) -> "SparseDist":
        return SparseDist(self.indices[i : i + 1], self.probs[i : i + 1], self.vocab_size)

    @staticmethod
    def concat(parts: list["SparseDist"]) -> "SparseDist":
        """Stacks rows of several distributions (padding the narrower ones with zero entries)."""
        if not parts:
            raise ValueError("concat needs at least one SparseDist")
        vocab = parts[0].vocab_size
        width = max(p.width for p in parts)
        idx, prb = [], []
        for p in parts:
            if p.vocab_size != vocab:
                raise ValueError(f"vocab sizes differ: {vocab} vs {p.vocab_size}")
            pad = width - p.width
            idx.append(torch.nn.functional.pad(p.indices, (0, pad)))
            prb.append(torch.nn.functional.pad(p.probs.float(), (0, pad)))
        return SparseDist(torch.cat(idx), torch.cat(prb), vocab)

    @staticmethod
    def empty(vocab_size: int) -> "SparseDist":
        return SparseDist(
            torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, 0, dtype=torch.float32), vocab_size
        )


def dense(probs: torch.Tensor) -> SparseDist:
    """Keeps every token: the dense baseline (``probs`` ``[n, V]``)."""
    n, vocab = probs.shape
    indices = torch.arange(vocab, dtype=torch.int64).expand(n, vocab).contiguous()
    return SparseDist(indices, probs.float().contiguous(), vocab)


def top_k(probs: torch.Tensor, k: int) -> SparseDist:
    """Keeps the ``k`` most likely tokens of each row and renormalises (TK-SLT).

    Args:
        probs: ``[n, V]`` probabilities.
        k: entries kept per row, ``1 <= k``; clipped to V.
    """
    if k < 1:
        raise ValueError(f"top-K needs k >= 1, got {k}")
    n, vocab = probs.shape
    vals, idx = torch.topk(probs.float(), min(k, vocab), dim=-1)  # [n, k]
    return SparseDist(idx, _renormalise(vals), vocab)


def top_p(probs: torch.Tensor, mass: float, max_k: int | None = None) -> SparseDist:
    """Keeps the smallest set of most likely tokens holding at least ``mass`` (TSLT), renormalised.

    Rows are padded to the widest kept set; ``max_k`` caps the set size.

    Args:
        probs: ``[n, V]`` probabilities.
        mass: cumulative probability to keep, in (0, 1].
        max_k: optional upper bound on entries per row.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"top-p mass must be in (0, 1], got {mass}")
    n, vocab = probs.shape
    sorted_p, sorted_idx = torch.sort(probs.float(), dim=-1, descending=True)  # [n, V]
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each entry
    keep = before < mass  # the first entry is always kept
    keep[:, 0] = True
    width = int(keep.sum(dim=-1).max().item()) if n else 0
    if max_k is not None:
        width = min(width, max_k)
    vals = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))[:, :width]
    return SparseDist(sorted_idx[:, :width].contiguous(), _renormalise(vals), vocab)


def _renormalise(vals: torch.Tensor) -> torch.Tensor:
    total = vals.sum(dim=-1, keepdim=True)
    # A row whose kept mass underflowed to 0 (all -inf logits but one rounding) keeps its top entry.
    fallback = torch.zeros_like(vals)
    if vals.shape[-1]:
        fallback[:, 0] = 1.0
    return torch.where(total > 0, vals / total.clamp_min(1e-30), fallback).contiguous()



def normalised(dist: SparseDist) -> SparseDist:
    """Rows divided by their sums (a row of float16-rounded weights becomes a distribution)."""
    total = dist.probs.float().sum(dim=1, keepdim=True).clamp_min(1e-30)
    return SparseDist(dist.indices, dist.probs.float() / total, dist.vocab_size)
