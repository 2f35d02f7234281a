"""SpecFed's math against brute force: reconstruction, its bounds (held on every draw, attained where
the module says they are), the weighted average and the acceptance-rate bias; weights validation."""
from __future__ import annotations

import math

import pytest
import torch

from specmesh.policies import federated as fed
from specmesh.runtime.sparse import SparseDist

SLACK = 1e-6  # the rows travel in float32


def _draws(n: int = 200, seed: int = 0):
    """Random (p [3, V], q [3, V], k) triples: flat to peaked rows, K from 1 to V."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        vocab = int(torch.randint(2, 48, (1,), generator=gen))
        scale = float(torch.rand(1, generator=gen)) * 4 + 0.1
        p = torch.softmax(torch.randn(3, vocab, generator=gen, dtype=torch.float64) * scale, -1)
        q = torch.softmax(torch.randn(3, vocab, generator=gen, dtype=torch.float64) * scale, -1)
        yield p, q, int(torch.randint(1, vocab + 1, (1,), generator=gen))


def _check_reconstruction(reconstruct) -> None:
    """Raises AssertionError unless ``reconstruct`` obeys the documented contract on every draw."""
    for p, q, k in _draws():
        rows, kept = fed.truncate(p, k)
        sent = torch.zeros_like(p, dtype=torch.bool).scatter_(1, rows.indices, True)
        for strategy in fed.STRATEGIES:
            rebuilt = reconstruct(rows, kept, strategy, q)
            assert torch.allclose(rebuilt.sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-6), strategy
            assert (rebuilt >= 0).all()
            tv = fed.total_variation(rebuilt, p)
            bound = fed.reconstruction_bound(rows, kept, strategy, q)
            missing = 1 - p.masked_fill(~sent, 0).sum(-1)
            assert (tv <= bound + 1e-6).all(), (strategy, tv, bound)
            assert (bound <= missing + 1e-6).all()
            if strategy == fed.ZERO:  # exact: TV is the missing mass
                assert torch.allclose(tv, missing, atol=1e-6), (tv, missing)
            else:  # the sent values are kept as the worker had them
                assert torch.allclose(rebuilt[sent], p[sent], atol=1e-6)


def test_reconstruction_and_its_bounds_hold_on_every_draw():
    _check_reconstruction(fed.reconstruct)


def _not_renormalised(rows, kept, strategy, prior=None):
    """Mutation: zero-fill without renormalising (the sent values, the rest 0)."""
    head = rows.to_dense().double() * kept.double().view(-1, 1)
    return head if strategy == fed.ZERO else fed.reconstruct(rows, kept, strategy, prior)


def _spread_ignores_prior(rows, kept, strategy, prior=None):
    """Mutation: spread the missing mass over every token, sent ones included."""
    if strategy == fed.ZERO:
        return fed.reconstruct(rows, kept, strategy, prior)
    head = rows.to_dense().double() * kept.double().view(-1, 1)
    return head + (1 - kept.double().view(-1, 1)) / rows.vocab_size


@pytest.mark.parametrize("mutant", [_not_renormalised, _spread_ignores_prior])
def test_a_wrong_reconstruction_fails_the_checks(mutant):
    with pytest.raises(AssertionError):
        _check_reconstruction(mutant)


def test_the_spread_bound_is_attained_by_a_consistent_worst_case():
    """The bound is tight: a p that agrees with everything received reaches it (so a looser formula,
    e.g. the missing mass, would not pass for the right reason and a smaller one would be wrong)."""
    attained = 0
    for p, q, k in _draws(100, seed=1):
        rows, kept = fed.truncate(p, k)
        for strategy in (fed.SPREAD_UNIFORM, fed.SPREAD_Q):
            rebuilt = fed.reconstruct(rows, kept, strategy, q)
            bound = fed.reconstruction_bound(rows, kept, strategy, q)
            for i in range(3):
                worst = _worst_case(p[i], rows.indices[i], rebuilt[i])
                tv = float(fed.total_variation(rebuilt[i : i + 1], worst.view(1, -1)))
                assert abs(tv - float(bound[i])) < 1e-6, (strategy, tv, float(bound[i]))  # float32 rows
                attained += float(bound[i]) > 1e-3
    assert attained > 50  # the draws exercise non-trivial bounds


def _worst_case(p: torch.Tensor, sent: torch.Tensor, rebuilt: torch.Tensor) -> torch.Tensor:
    """p's sent values, and its missing mass m laid out as the docstring's vertex: t on the unsent
    tokens the reconstruction gave least, the remainder on the next."""
    out = torch.zeros_like(p)
    out[sent] = p[sent]
    t, m = float(p[sent].min()), 1 - float(p[sent].sum())
    unsent = [j for j in torch.argsort(rebuilt).tolist() if j not in set(sent.tolist())]
    for j in unsent:
        put = min(t, m)
        out[j], m = put, m - put
    return out


def test_average_bias_and_acceptance_bias_within_the_weighted_bound():
    gen = torch.Generator().manual_seed(2)
    for p, q, k in _draws(100, seed=3):
        others = [torch.softmax(torch.randn_like(p) * 2 + p.log(), -1) for _ in range(2)]
        workers = [p, *others]
        weights = fed.check_weights(torch.rand(3, generator=gen).add(0.05).tolist(), 3)
        truth = sum(w * x for w, x in zip(weights, workers))
        for strategy in fed.STRATEGIES:
            replies = [fed.truncate(x, k) for x in workers]
            rebuilt = [fed.reconstruct(r, kept, strategy, q) for r, kept in replies]
            bounds = [fed.reconstruction_bound(r, kept, strategy, q) for r, kept in replies]
            average = fed.aggregate(rebuilt, weights)
            assert torch.allclose(average, sum(w * x for w, x in zip(weights, rebuilt)))
            bound = fed.aggregate_bound(bounds, weights)
            assert (fed.total_variation(average, truth) <= bound + SLACK).all()
            bias = (fed.acceptance_rate(average, q) - fed.acceptance_rate(truth, q)).abs()
            assert (bias <= bound + SLACK).all()


def test_dense_reconstruction_is_the_distribution_itself():
    p = torch.softmax(torch.randn(4, 30, dtype=torch.float64), -1)
    for strategy in fed.STRATEGIES:
        rows, kept = fed.truncate(p, fed.DENSE_K)
        assert torch.allclose(fed.reconstruct(rows, kept, strategy, p), p, atol=1e-6)
        assert float(fed.reconstruction_bound(rows, kept, strategy).max()) < 1e-6


def test_truncate_keeps_the_top_k_and_its_mass():
    p = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
    rows, kept = fed.truncate(p, 2)
    assert sorted(rows.indices[0].tolist()) == [0, 2]
    assert torch.allclose(kept, torch.tensor([0.8, 0.5]))
    assert torch.allclose(rows.probs.sum(-1), torch.ones(2))


def test_spread_q_follows_the_draft_and_falls_back_to_uniform():
    rows = SparseDist(torch.tensor([[0], [0]]), torch.ones(2, 1), 4)
    kept = torch.tensor([0.6, 0.6])
    prior = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # row 1: no q mass outside S
    out = fed.reconstruct(rows, kept, fed.SPREAD_Q, prior)
    assert torch.allclose(out[0], torch.tensor([0.6, 0.4, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(out[1], torch.tensor([0.6, 0.4 / 3, 0.4 / 3, 0.4 / 3], dtype=torch.float64))


@pytest.mark.parametrize("weights,match", [
    ((1.0,), "one weight per worker"), ((1.0, 0.0), r"weights\[1\] = 0.0"), ((1.0, -2), r"weights\[1\] = -2"),
    ((1.0, math.nan), r"weights\[1\] = nan"), ((True, 1.0), r"weights\[0\] = True"), ("ab", "one weight"),
])
def test_bad_weights_are_refused_by_name(weights, match):
    with pytest.raises(ValueError, match=match):
        fed.check_weights(weights, 2)


def test_weights_are_normalised_and_default_to_equal():
    assert fed.check_weights((3, 1), 2) == (0.75, 0.25)
    assert fed.check_weights((), 4) == (0.25,) * 4
    with pytest.raises(ValueError, match="at least one worker"):
        fed.FederatedSettings(())
    with pytest.raises(ValueError, match="strategy 'spread'"):
        fed.FederatedSettings((1.0,), 4, "spread")
    with pytest.raises(ValueError, match="top_k"):
        fed.FederatedSettings((1.0,), -1)
