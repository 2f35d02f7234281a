"""Draft-side sparsifiers (TSLT / TK-SLT): which part of q crosses the uplink.

The draft samples *after* sparsifying, from exactly the distribution these return, so exact
verification stays lossless whichever is chosen; they differ in bytes and in acceptance. Each is a
small object built from the session's policy map: the draft worker calls it and never branches on
its name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from specmesh.runtime import sparse

from .registry import Registry

PolicyMap = Mapping[str, object]

DEFAULT_K = 16
DEFAULT_MASS = 0.95


def _int_option(policy: PolicyMap, key: str, default: int, lo: int) -> int:
    value = policy.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{key} = {value!r}: must be an integer >= {lo}")
    return value


def _unit_option(policy: PolicyMap, key: str, default: float) -> float:
    value = policy.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{key} = {value!r}: must be a number in (0, 1]")
    return float(value)


class Sparsifier:
    """Truncates draft distributions for the uplink.

    ``__call__`` truncates sampled-mode rows; :meth:`greedy_rows` says what ships with greedy picks
    (at temperature 0 the verifier compares with its argmax only, so one entry per candidate, the
    fewest bytes the wire accepts, is enough: the default).
    """

    def __call__(self, probs: torch.Tensor) -> sparse.SparseDist:
        """``probs`` ``[n, V]`` -> n truncated, renormalised rows."""
        raise NotImplementedError

    def greedy_rows(self, logits: torch.Tensor, picks: torch.Tensor) -> sparse.SparseDist:
        """The q shipped with greedy candidates ``picks`` ``[c]`` drafted from ``logits`` ``[V]``:
        a one-entry row per candidate."""
        return sparse.SparseDist(picks.view(-1, 1), torch.ones(picks.numel(), 1), logits.numel())


@dataclass(frozen=True)
class Dense(Sparsifier):
    """The whole vocabulary: the classic distributed baseline the papers improve on. It ships the
    whole q at temperature 0 too: its point is to send what the classic scheme sends."""

    def __call__(self, probs: torch.Tensor) -> sparse.SparseDist:
        return sparse.dense(probs)

    def greedy_rows(self, logits: torch.Tensor, picks: torch.Tensor) -> sparse.SparseDist:
        q = sparse.dense(torch.softmax(logits.float().view(1, -1), -1))
        return sparse.SparseDist.concat([q] * picks.numel())


@dataclass(frozen=True)
class TopK(Sparsifier):
    """TK-SLT: the ``k`` most likely tokens."""

    k: int = DEFAULT_K

    def __call__(self, probs: torch.Tensor) -> sparse.SparseDist:
        return sparse.top_k(probs, self.k)


@dataclass(frozen=True)
class TopP(Sparsifier):
    """TSLT: the smallest set holding ``mass``, capped at ``k`` entries."""

    mass: float = DEFAULT_MASS
    k: int = DEFAULT_K

    def __call__(self, probs: torch.Tensor) -> sparse.SparseDist:
        return sparse.top_p(probs, self.mass, max_k=self.k)


SparsifierFactory = Callable[[PolicyMap], Sparsifier]
SPARSIFIERS: Registry[SparsifierFactory] = Registry("sparsifier")
SPARSIFIERS.register("dense")(lambda policy: Dense())
SPARSIFIERS.register("top-k")(lambda policy: TopK(_int_option(policy, "sparse_k", DEFAULT_K, 1)))
SPARSIFIERS.register("top-p")(
    lambda policy: TopP(_unit_option(policy, "sparse_mass", DEFAULT_MASS),
                        _int_option(policy, "sparse_k", DEFAULT_K, 1))
)


def make_sparsifier(policy: PolicyMap) -> Sparsifier:
    """The sparsifier named by ``policy["sparsifier"]`` (default ``top-k``), with its options."""
    name = policy.get("sparsifier", "top-k")
    if not isinstance(name, str):
        raise ValueError(f"sparsifier = {name!r}: must be a sparsifier name")
    return SPARSIFIERS.get(name)(policy)
