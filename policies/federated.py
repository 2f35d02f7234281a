"""SpecFed's math: a worker's distribution rebuilt from its top-K, the weighted average, and the
error bounds of both. Pure tensor functions (no model, no wire), tested against brute force.

Notation, per position: ``p`` a worker's true (warped) distribution over ``V`` tokens; ``S`` the ids it
sent (its top-K), ``s = p(S)`` the kept mass, ``m = 1 - s`` the missing mass, ``t = min_{i in S} p_i``
(every unsent ``p_j <= t``, since ``S`` is the top-K). The aggregator knows ``S``, ``p_S``, ``m`` and
the draft's q, never the unsent values.

Strategies (:data:`STRATEGIES`) and the exact bound of each on ``TV(p_hat, p) = 1/2 sum |p_hat - p|``:

- ``zero``: ``p_hat = p_S / s`` (zero-fill, renormalise). ``TV = 1/2 [s (1/s - 1) + m] = m`` exactly,
  on every draw: the bound is the missing mass and it is always attained.
- ``spread-uniform`` / ``spread-q``: keep ``p_S`` as it is and put ``a_j = m r_j`` on every unsent
  ``j``, with ``r`` uniform over the unsent tokens, or the draft's q there renormalised (uniform where q
  has no mass outside ``S``; the bonus position, which no q covers, is spread uniformly). Both sides
  hold mass ``m`` outside ``S``, so ``TV = sum_{j not in S} (p_j - a_j)^+ <= m``. The worst case over
  every ``p`` consistent with what was received (``0 <= p_j <= t``, ``sum p_j = m``) puts ``t`` on the
  ``n = floor(m / t)`` unsent tokens of smallest ``a`` and the rest ``rho = m - n t`` on the next one:
  ``B = sum_{i < n} (t - a_(i))^+ + (rho - a_(n))^+`` (``a`` sorted ascending). The maximum of a convex
  function over that polytope is at a vertex, and pairing the largest values with the smallest ``a``
  is optimal, so ``B`` is attained: the bound is tight. Always ``B <= m``; for uniform ``r`` it is
  ``n (t - c) + (rho - c)^+`` with ``c = m / (V - K)``.

Aggregation: ``p_hat = sum_m w_m p_hat_m``, ``p_bar = sum_m w_m p_m``; by convexity of TV,
``TV(p_hat, p_bar) <= sum_m w_m TV(p_hat_m, p_m) <= sum_m w_m B_m`` (the aggregation bias).
Acceptance: the exact test at a position accepts with probability ``alpha(p, q) = sum_x min(p, q) =
1 - TV(p, q)``, so ``|alpha(p_hat, q) - alpha(p_bar, q)| <= TV(p_hat, p_bar) <= sum_m w_m B_m`` (the
acceptance-rate bias). Exact speculative sampling against ``p_hat`` commits tokens distributed as
``p_hat``, so the same bound holds for each committed token's distribution given its prefix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from specmesh.runtime.sparse import SparseDist

ZERO = "zero"
SPREAD_UNIFORM = "spread-uniform"
SPREAD_Q = "spread-q"
STRATEGIES = (ZERO, SPREAD_UNIFORM, SPREAD_Q)
DENSE_K = 0  # top_k = 0: every token is sent (the dense setting; exact weighted average)
_TINY = 1e-300


def check_strategy(strategy: object) -> str:
    """``strategy`` if it is one of :data:`STRATEGIES`; ValueError naming it otherwise."""
    if strategy not in STRATEGIES:
        raise ValueError(f"federated strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    return strategy  # type: ignore[return-value]


def check_top_k(top_k: object) -> int:
    """``top_k`` if it is an int >= 0 (0 = dense, every token); ValueError otherwise."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"federated top_k must be an integer >= 1, or 0 for dense; got {top_k!r}")
    return top_k


def check_weights(weights: Sequence[float] | None, num_workers: int) -> tuple[float, ...]:
    """Worker weights, validated and normalised to sum to 1 (None or empty: equal weights).

    Raises:
        ValueError: a weight that is not a finite number > 0, or not one weight per worker.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"a federated deployment needs at least one worker, got {num_workers!r}")
    if weights is None or len(weights) == 0:
        return tuple(1.0 / num_workers for _ in range(num_workers))
    if isinstance(weights, (str, bytes)) or len(weights) != num_workers:
        raise ValueError(f"federated weights {weights!r}: need one weight per worker ({num_workers})")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"federated weights[{i}] = {w!r}: must be a finite number > 0")
    total = math.fsum(float(w) for w in weights)
    return tuple(float(w) / total for w in weights)


@dataclass(frozen=True)
class FederatedSettings:
    """How a federated deployment reconstructs and averages (validated; weights normalised).

    Attributes:
        weights: one weight per worker, normalised to sum to 1.
        top_k: entries each worker sends per position (0 = dense: every token).
        strategy: reconstruction strategy, one of :data:`STRATEGIES`.
    """

    weights: tuple[float, ...]
    top_k: int = DENSE_K
    strategy: str = ZERO

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", check_weights(tuple(self.weights), len(self.weights)))
        check_top_k(self.top_k)
        check_strategy(self.strategy)

    @property
    def num_workers(self) -> int:
        return len(self.weights)


# ------------------------------------------------------------------ worker side


def truncate(p: torch.Tensor, top_k: int) -> tuple[SparseDist, torch.Tensor]:
    """A worker's reply: its top-``top_k`` entries per row, renormalised, and the mass they hold.

    Args:
        p: ``[n, V]`` the worker's (warped) probabilities.
        top_k: entries per row (0 or >= V: every token).
    Returns:
        ``rows`` (``n`` rows, each summing to 1) and ``kept`` ``[n]`` float32, ``p(S)`` per row.
    """
    n, vocab = p.shape
    k = vocab if top_k == DENSE_K else min(check_top_k(top_k), vocab)
    vals, idx = torch.topk(p.double(), k, dim=-1)  # [n, k]
    kept = vals.sum(dim=-1)  # [n]
    rows = torch.where(kept.view(-1, 1) > 0, vals / kept.clamp_min(_TINY).view(-1, 1), vals)
    return SparseDist(idx, rows.float(), vocab), kept.clamp(0.0, 1.0).float()


# ------------------------------------------------------------------ aggregator side


def _received(rows: SparseDist, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``head`` ``[n, V]`` float64 (the sent values as the worker had them, 0 elsewhere), the sent
    mask ``[n, V]`` and the missing mass ``[n, 1]``."""
    listed = rows.to_dense().double()  # [n, V]
    listed = listed / listed.sum(dim=1, keepdim=True).clamp_min(_TINY)
    sent = torch.zeros_like(listed).scatter_add_(1, rows.indices, (rows.probs > 0).double()) > 0
    s = kept.double().clamp(0.0, 1.0).view(-1, 1)  # [n, 1]
    return listed * s, sent, 1.0 - s


def _spread_weights(sent: torch.Tensor, strategy: str, prior: torch.Tensor | None) -> torch.Tensor:
    """``r`` ``[n, V]``: where the missing mass goes (rows sum to 1 over the unsent tokens, or are 0
    when every token was sent)."""
    unsent = (~sent).double()  # [n, V]
    r = unsent
    if strategy == SPREAD_Q and prior is not None:
        by_q = prior.double().clamp_min(0.0) * unsent
        has_q = by_q.sum(dim=1, keepdim=True) > 0
        r = torch.where(has_q, by_q, unsent)  # no q mass outside S: uniform
    return r / r.sum(dim=1, keepdim=True).clamp_min(_TINY)


def reconstruct(rows: SparseDist, kept: torch.Tensor, strategy: str,
                prior: torch.Tensor | None = None) -> torch.Tensor:
    """A worker's distribution rebuilt from its reply.

    Args:
        rows: ``n`` rows, the sent top-K renormalised (as :func:`truncate` makes them).
        kept: ``[n]`` the worker's mass on the sent entries.
        strategy: one of :data:`STRATEGIES`.
        prior: ``[n, V]`` the draft's q at each position for ``spread-q`` (a zero row: uniform).
    Returns:
        ``[n, V]`` float64, rows summing to 1.
    """
    check_strategy(strategy)
    head, sent, missing = _received(rows, kept)
    if strategy == ZERO:
        out = head
    else:
        out = head + missing * _spread_weights(sent, strategy, prior)
    return out / out.sum(dim=1, keepdim=True).clamp_min(_TINY)


def reconstruction_bound(rows: SparseDist, kept: torch.Tensor, strategy: str,
                         prior: torch.Tensor | None = None) -> torch.Tensor:
    """The tight bound on ``TV(reconstruct(...), p)`` from what was received (module docstring).

    Returns:
        ``[n]`` float64: ``m`` for ``zero``; the worst case ``B <= m`` for the spread strategies.
    """
    check_strategy(strategy)
    head, sent, missing = _received(rows, kept)
    m = missing.view(-1)  # [n]
    if strategy == ZERO:
        return m
    a = missing * _spread_weights(sent, strategy, prior)  # [n, V]
    t = torch.where(sent, head, torch.full_like(head, math.inf)).min(dim=1).values  # [n]
    a_sorted = torch.where(sent, torch.full_like(a, math.inf), a).sort(dim=1).values  # unsent first
    out = torch.zeros_like(m)
    for i in range(m.numel()):
        free = int((~sent[i]).sum())
        if m[i] <= 0 or free == 0 or not t[i] > 0:
            continue
        full = min(int(math.floor(float(m[i] / t[i]))), free)
        rho = float(m[i]) - full * float(t[i])
        total = float((float(t[i]) - a_sorted[i, :full]).clamp_min(0.0).sum())
        if full < free and rho > 0:
            total += max(rho - float(a_sorted[i, full]), 0.0)
        out[i] = min(total, float(m[i]))
    return out


def aggregate(dists: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_m w_m p_m``: ``M`` tensors ``[n, V]`` and ``M`` weights (normalised) -> ``[n, V]``."""
    w = check_weights(weights, len(dists))
    out = torch.zeros_like(dists[0], dtype=torch.float64)
    for weight, dist in zip(w, dists):
        out = out + weight * dist.double()
    return out


def aggregate_bound(bounds: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The aggregation (and acceptance-rate) bias bound ``sum_m w_m B_m``: ``M`` x ``[n]`` -> ``[n]``."""
    w = check_weights(weights, len(bounds))
    return sum(weight * b.double() for weight, b in zip(w, bounds))


def total_variation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1/2 sum |a - b|`` per row: ``[n, V]`` x2 -> ``[n]`` float64."""
    return 0.5 * (a.double() - b.double()).abs().sum(dim=-1)


def acceptance_rate(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Probability the exact test accepts ``x ~ q`` against ``p``: ``sum min(p, q)`` per row -> ``[n]``."""
    return torch.minimum(p.double(), q.double()).sum(dim=-1)


def federated_settings(workers: Sequence[str], weights: Sequence[float], top_k: int,
                       strategy: str) -> FederatedSettings:
    """The settings of ``SpecConfig``'s ``federated_*`` fields, every value checked.

    Raises:
        ValueError / TypeError: naming the bad field and value.
    """
    if isinstance(workers, str) or not isinstance(workers, (tuple, list)):
        raise TypeError(f"federated_workers must be a tuple of model names, got {workers!r}")
    for i, name in enumerate(workers):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"federated_workers[{i}] = {name!r}: must name a target model")
    if weights and not workers:
        raise ValueError(f"federated_weights {tuple(weights)!r} given without federated_workers")
    return FederatedSettings(check_weights(weights, len(workers)), check_top_k(top_k), check_strategy(strategy))
