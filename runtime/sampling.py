"""Logits to probabilities, and seeded sampling. Pure tensor math, a leaf module.

Randomness is always passed in as a ``torch.Generator``; :func:`generator_for` derives one per
(seed, stream, position) so that a token's random draw does not depend on how many draws came before
it (rounds can be re-ordered, speculated or replayed and a seeded run still repeats exactly).
"""
from __future__ import annotations

import hashlib

import torch

# Streams of randomness, one per role, so the draft and the verifier never share draws.
STREAM_DRAFT = 0
STREAM_VERIFY = 1


def warp_logits(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Applies the user's sampling warpers to logits and returns probabilities.

    Temperature 0 means greedy: a one-hot distribution on the argmax.

    Args:
        logits: ``[n, V]`` raw logits (any float dtype; computed in fp32).
        temperature: ``>= 0``.
        top_k: keep the k largest logits (0 disables).
        top_p: keep the smallest set with at least this mass (1.0 disables).
    Returns:
        ``[n, V]`` float32 probabilities.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [n, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draws one index per row of ``probs`` (``[n, V]``, rows need not be normalised) -> ``[n]``."""
    return torch.multinomial(probs.float(), 1, generator=generator).view(-1)


def uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` uniform draws in [0, 1) -> ``[n]`` float32."""
    return torch.rand(n, generator=generator)


def generator_for(seed: int, stream: int, position: int) -> torch.Generator:
    """A generator keyed by (seed, stream, position): the same key always gives the same draws."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{position}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
