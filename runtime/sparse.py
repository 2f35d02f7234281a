"""Sparse probability distributions: the truncated q that crosses the uplink (TSLT / TK-SLT).

A :class:`SparseDist` holds, for each of ``n`` positions, ``k`` token ids and their probabilities.
Every entry not listed has probability exactly 0. Rows may be padded: padding entries carry
probability 0 (their index is irrelevant but must be inside the vocabulary).

:func:`quantise_fp16` is the q a draft worker samples from: the distribution exactly as a receiver
decodes it from the float16 wire. The encoder picks the fp16 values so that the row sum is within
``FP16_SUM_TOLERANCE`` (about 2**-12) of 1, close enough that every renormalised value still rounds
back to the same fp16: quantisation is idempotent, so a draft may send the very q it sampled from and
the receiver rebuilds it bit for bit (lossless needs the sender to sample from exactly the q the
verifier uses). The row sum is exact in float64 (fp16 values are multiples of 2**-24), so sender and
receiver agree bit for bit on any machine.

This module is a leaf: it imports nothing of SpecMesh.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# A row of probabilities must sum to 1 within this. A float32 softmax over V entries can be off by up
# to V * 2**-24 (9e-3 for Qwen's 151,936; measured up to 2e-4 on peaked rows).
ROW_SUM_TOLERANCE = 1e-2
# A float16 row must sum to 1 within this. Dividing a row by a sum this close to 1 moves every value
# by less than half the gap to its fp16 neighbour (>= 2**-12 of the value), with 2**-16 to spare for
# float32 rounding, so a decoded row re-encodes to the very same fp16 values.
FP16_SUM_TOLERANCE = 2.0**-12 - 2.0**-16
_FP16_SMALLEST = 2.0**-24  # smallest positive (subnormal) float16
# Repair jumps the encoder may make on one row; two suffice (a coarse one, then a fine one).
_FIXUP_MAX_JUMPS = 8


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


def is_dense(dist: SparseDist) -> bool:
    """True when ``dist`` lists every token in order (the dense baseline of :func:`dense`)."""
    if dist.width != dist.vocab_size or dist.num_positions == 0:
        return False
    return bool((dist.indices == torch.arange(dist.vocab_size)).all())


def quantise_fp16(dist: SparseDist) -> SparseDist:
    """``dist`` exactly as a receiver decodes it from the float16 wire: sample from this, send it.

    Each row is rounded to float16 (repaired to sum to 1 within ``FP16_SUM_TOLERANCE``) and divided
    by its exact sum; its positive entries come first, sorted by token id, and zero entries become
    padding (index 0, probability 0). A dense ``dist`` travels in float32 and keeps its values.
    Idempotent: ``quantise_fp16(quantise_fp16(d))`` equals ``quantise_fp16(d)`` bit for bit.

    Args:
        dist: ``n`` rows of probabilities over ``dist.vocab_size`` tokens.
    Returns:
        A :class:`SparseDist` of the same shape, int64 indices, float32 probabilities.
    Raises:
        ValueError: a row is not a distribution (non-finite, negative, or not summing to 1 within
            ``ROW_SUM_TOLERANCE``).
    """
    probs = check_rows(dist.probs.detach().cpu().double(), "q", ROW_SUM_TOLERANCE)  # [n, k]
    if is_dense(dist):
        return dense(dist.probs.detach().cpu())
    h16 = round_fp16(probs / probs.sum(dim=1, keepdim=True))  # exact ratio, then rounded
    indices, h16 = positive_first(dist.indices.detach().cpu().long(), h16, dist.vocab_size)
    return SparseDist(indices, renormalise_fp16(h16, h16.double().sum(dim=1, keepdim=True)), dist.vocab_size)


def check_rows(probs: torch.Tensor, label: str, tolerance: float) -> torch.Tensor:
    """Rejects rows that are not distributions: ``[n, k]`` float64 -> itself, negative zeros cleared.

    Raises:
        ValueError: naming ``label`` and the offending row.
    """
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{label}: probabilities must be finite (found NaN or inf)")
    if bool((probs < 0).any()):
        raise ValueError(f"{label}: probabilities must be >= 0, found {float(probs.min())}")
    sums = probs.sum(dim=1)
    bad = (sums - 1).abs() > tolerance
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(f"{label}: row {row} sums to {float(sums[row])!r}, not 1 within {tolerance}")
    return probs.clamp_min(0.0)  # -0.0 -> 0.0 keeps fp16 bit patterns canonical


def positive_first(indices: torch.Tensor, values: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[n, k]`` reordered: positive entries first, by token id; the rest zeroed padding."""
    keep = values > 0  # [n, k]
    order = torch.sort(torch.where(keep, indices, vocab_size), dim=1, stable=True).indices
    keep = keep.gather(1, order)
    indices = torch.where(keep, indices.gather(1, order), 0)
    return indices, torch.where(keep, values.gather(1, order), torch.zeros((), dtype=values.dtype))


def renormalise_fp16(h16: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Receiver's arithmetic: fp16 values divided by their row's exact float64 ``sums`` -> float32.

    ``h16`` is any shape and ``sums`` broadcasts to it; sender and receiver both call this, so their
    float32 values agree bit for bit.
    """
    return (h16.double() / sums).float()


def round_fp16(probs: torch.Tensor) -> torch.Tensor:
    """Sender side: rows ``[n, k]`` float64 summing to 1 -> fp16 rows the receiver accepts.

    Round to nearest can leave a row up to 2**-11 off, above :data:`FP16_SUM_TOLERANCE`; such a row
    is repaired by :func:`_fix_row`.
    """
    h16 = probs.to(torch.float16)
    off = (h16.double().sum(dim=1) - 1).abs() > FP16_SUM_TOLERANCE  # [n]
    for row in off.nonzero().view(-1).tolist():
        h16[row] = _fix_row(h16[row].clone())
    return h16


def _fix_row(h16: torch.Tensor) -> torch.Tensor:
    """Moves entries of one fp16 row ``[k]`` (in place) until it sums to 1 within the tolerance.

    Each jump gives one positive entry the whole missing mass (rounded to fp16), choosing, among the
    entries that would land the row within tolerance, the one changed least relative to its value
    (else the one that lands closest). Zeros stay zero and positives stay positive, so the support of
    the distribution is kept; the sender samples from the result, so this costs no exactness.
    """
    for _ in range(_FIXUP_MAX_JUMPS):
        value = h16.double()
        missing = 1.0 - float(value.sum())
        if abs(missing) <= FP16_SUM_TOLERANCE:
            return h16
        moved = (value + missing).clamp_min(_FP16_SMALLEST).to(torch.float16)  # [k]
        change = moved.double() - value
        landing = (missing - change).abs()
        relative = change.abs() / value.clamp_min(_FP16_SMALLEST)
        never = torch.full_like(value, math.inf)
        landing = torch.where(value > 0, landing, never)
        lands = landing <= FP16_SUM_TOLERANCE
        j = int(torch.where(lands, relative, never).argmin()) if bool(lands.any()) else int(landing.argmin())
        h16[j] = moved[j]
    raise ValueError(f"cannot round a row summing to {float(h16.double().sum())!r} to float16 "
                     f"within {FP16_SUM_TOLERANCE} of 1")
