"""SpecFed end to end, statistically: the shipped draft worker, federated workers (tiny models of
different seeds), the wire and the aggregator, one round per seeded session.

With K = V the committed tokens follow the exact weighted average of the workers' distributions
(chi-square of the first token, Kolmogorov-Smirnov of the probability integral transform of every
committed token given its prefix); with top-K and zero-fill they follow the reconstructed average.
Reconstruction error, aggregation bias and acceptance-rate bias, measured against the dense average
on every round, stay within the bounds the aggregator computes. The power tests plant an unweighted
average and a reconstruction that is not renormalised and require the checks to fail.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from shipped_stats import follows

from specmesh.actors import hf
from specmesh.cluster.federated import build_federated
from specmesh.policies import federated as fed
from specmesh.runtime.config import SpecConfig
from specmesh.runtime.messages import OpenSession, ProposeRequest, SamplingParams

torch.set_num_threads(1)
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7]
ROUNDS = 1000
SIGNIFICANCE = 1e-3
WEIGHTS = (0.75, 0.25)
POLICY = {"sparsifier": "top-k", "sparse_k": 16, "acceptance": "exact"}


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    config = SpecConfig(target="tiny", draft="tiny-draft:seed=1,noise=0.3", dtype="float32", num_stages=1,
                        federated_workers=("tiny:seed=1", "tiny:seed=2"), federated_weights=WEIGHTS,
                        cache_dir=str(tmp_path_factory.mktemp("models")))
    b = build_federated(config)
    yield b
    b.close()


def _worker_p(backend, prefix: list[int], memo: dict) -> list[torch.Tensor]:
    """Each worker's next-token distribution after ``prefix`` (``[V]`` float64), temperature 1."""
    key = tuple(prefix)
    if key not in memo:
        out = []
        for w in backend.target.workers:
            m = w.stages[0].model
            hidden = hf.forward(m, m.new_cache(), input_ids=torch.tensor(prefix), position_ids=torch.arange(len(prefix)))
            out.append(torch.softmax(hf.lm_head(m, hidden[-1:])[0].double(), -1))
        memo[key] = out
    return memo[key]


def _expected(ps: list[torch.Tensor], k: int) -> torch.Tensor:
    """The weighted average of zero-filled top-``k`` rows (k = 0: of the dense rows), by hand."""
    rows = []
    for p in ps:
        if k:
            keep = torch.zeros_like(p).scatter_(0, torch.topk(p, k).indices, 1.0)
            p = p * keep / (p * keep).sum()
        rows.append(p)
    return WEIGHTS[0] * rows[0] + WEIGHTS[1] * rows[1]


def _rounds(backend, target, gamma: int = 3, n: int = ROUNDS):
    draft = backend.drafter.worker
    for seed in range(n):
        sid = f"s{seed}"
        opened = OpenSession(sid, SamplingParams(temperature=1.0, seed=seed), POLICY)
        draft.open(opened)
        target.open(opened)
        try:
            yield target.verify(draft.propose(ProposeRequest(sid, 1, 0, PROMPT, gamma, 0, 1, [])))
        finally:
            draft.close(sid)
            target.close(sid)


def _pvalues(backend, k: int, pit: bool = True) -> tuple[float, float]:
    """Chi-square of the first committed token and KS of the PIT of every committed token, both
    against the zero-filled top-``k`` weighted average (``k = 0``: the exact weighted average)."""
    target = backend.target.with_settings(fed.FederatedSettings(WEIGHTS, k, fed.ZERO))
    memo: dict = {}
    rounds = [v.tokens for v in _rounds(backend, target, n=ROUNDS if pit else ROUNDS // 2)]
    return follows(rounds, lambda prefix: _expected(_worker_p(backend, prefix, memo), k), PROMPT, pit)


def test_dense_output_follows_the_exact_weighted_average(backend):
    first, pit = _pvalues(backend, 0)
    assert first > SIGNIFICANCE and pit > SIGNIFICANCE, (first, pit)


def test_top_k_output_follows_the_reconstructed_average(backend):
    first, pit = _pvalues(backend, 4)
    assert first > SIGNIFICANCE and pit > SIGNIFICANCE, (first, pit)


def _unweighted(dists, weights):
    return _REAL_AGGREGATE(dists, [1.0] * len(dists))


def _not_renormalised(rows, kept, strategy, prior=None):
    return rows.to_dense().double() * kept.double().view(-1, 1)


_REAL_AGGREGATE = fed.aggregate


@pytest.mark.parametrize("attr,mutant,k", [("aggregate", _unweighted, 0), ("reconstruct", _not_renormalised, 4)],
                         ids=["unweighted-average", "not-renormalised"])
def test_each_mutation_is_caught(backend, monkeypatch, attr, mutant, k):
    monkeypatch.setattr(fed, attr, mutant)
    first, _ = _pvalues(backend, k, pit=False)
    assert first < SIGNIFICANCE, first


@pytest.mark.parametrize("strategy", fed.STRATEGIES)
def test_biases_measured_against_the_dense_average_stay_within_the_bounds(backend, strategy):
    """Every round, every position: TV(rebuilt, worker's p) <= its bound (= for zero-fill), TV(average,
    dense average) <= the weighted bound, |alpha(average, q) - alpha(dense, q)| <= the same bound."""
    seen = {"rows": 0, "biased": 0}

    def probe(proposal, truths, agg):
        dense = sum(w * p.double() for w, p in zip(WEIGHTS, truths))
        for p, rebuilt, bound in zip(truths, agg.rebuilt, agg.bounds):
            tv = fed.total_variation(rebuilt, p)
            assert (tv <= bound + 1e-5).all(), (tv, bound)
            if strategy == fed.ZERO:
                assert torch.allclose(tv, bound, atol=1e-5)
        assert (fed.total_variation(agg.average, dense) <= agg.bound + 1e-5).all()
        g = proposal.num_candidates
        q = proposal.q.to_dense()  # [g, V]
        bias = (fed.acceptance_rate(agg.average[:g], q) - fed.acceptance_rate(dense[:g], q)).abs()
        assert (bias <= agg.bound[:g] + 1e-5).all(), (bias, agg.bound)
        seen["rows"] += g + 1
        seen["biased"] += int((agg.bound > 1e-3).sum())

    for k in (1, 4, 16):
        target = backend.target.with_settings(fed.FederatedSettings(WEIGHTS, k, strategy))
        target.probe = probe
        for _ in _rounds(backend, target, gamma=4, n=30):
            pass
    assert seen["biased"] > seen["rows"] // 2  # the bounds were not trivially zero


def test_a_pipelined_worker_matches_a_single_stage_worker(backend, tmp_path):
    """A worker split into two stages answers as the whole model does: same greedy output."""
    from specmesh.runtime import SpecMesh

    base = dict(target="tiny", draft="tiny-draft:seed=1,noise=0.3", dtype="float32", max_new_tokens=16,
                federated_workers=("tiny:seed=1", "tiny:seed=2"), federated_weights=WEIGHTS, federated_k=4,
                cache_dir=str(tmp_path))
    outs = []
    for stages in (1, 2):
        with SpecMesh(SpecConfig(**base, num_stages=stages)) as engine:
            result = engine.generate(PROMPT)
            outs.append(result.output_ids)
            assert result.stats.bytes_down > 0 and result.stats.bytes_up > 0
    assert outs[0] == outs[1] and len(outs[0]) > 1
    assert dataclasses.is_dataclass(SpecConfig)
