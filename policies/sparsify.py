"""Draft-side sparsifiers (TSLT / TK-SLT): which part of q crosses the uplink.

The draft samples *after* sparsifying, from exactly the distribution these return, so exact
verification stays lossless whichever is chosen; they differ in bytes and in acceptance.
"""
from __future__ import annotations

from typing import Callable

import torch

from specmesh.runtime import sparse
from specmesh.runtime.messages import SamplingParams

from .registry import Registry

Sparsifier = Callable[[torch.Tensor, SamplingParams], sparse.SparseDist]
SPARSIFIERS: Registry[Sparsifier] = Registry("sparsifier")


@SPARSIFIERS.register("dense")
def _dense(probs: torch.Tensor, params: SamplingParams) -> sparse.SparseDist:
    """The whole vocabulary: the classic distributed baseline the papers improve on."""
    return sparse.dense(probs)


@SPARSIFIERS.register("top-k")
def _top_k(probs: torch.Tensor, params: SamplingParams) -> sparse.SparseDist:
    """TK-SLT: the ``sparse_k`` most likely tokens."""
    return sparse.top_k(probs, params.sparse_k)


@SPARSIFIERS.register("top-p")
def _top_p(probs: torch.Tensor, params: SamplingParams) -> sparse.SparseDist:
    """TSLT: the smallest set holding ``sparse_mass``, capped at ``sparse_k`` entries."""
    return sparse.top_p(probs, params.sparse_mass, max_k=params.sparse_k)


def sparsify(probs: torch.Tensor, params: SamplingParams) -> sparse.SparseDist:
    """Applies the sparsifier named by ``params.sparsifier`` to ``probs`` ``[n, V]``."""
    return SPARSIFIERS.get(params.sparsifier)(probs, params)
