"""Split verification's math (policies/split.py) on hand-built distributions, with its mutations.

One split round of one drafted token, run through the shipped functions exactly as the stage and
the draft worker call them (``verify_split`` at the edge, ``correction_generator`` and
``draw_correction`` on the device): the committed token must follow p (chi-square). Each classic
bug, planted in the same code, must fail the same check: the ratio inverted, the residual taken
with the wrong q, a p_j truncated so that it misses a token where p_j > q_j (the coverage rule).
"""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2

from specmesh.policies import split
from specmesh.policies.acceptance import Exact
from specmesh.runtime import sampling
from specmesh.runtime.messages import SamplingParams
from specmesh.runtime.sparse import SparseDist
from specmesh.runtime.verify import chain_tests

SIGNIFICANCE = 1e-3
DRAWS = 6000
# p and q over 6 tokens: p > q on tokens 0 and 2 (where the residual lives), p = 0 on token 5.
P = torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05, 0.00])
Q = torch.tensor([0.10, 0.40, 0.05, 0.15, 0.10, 0.20])
P_NEXT = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.5])  # after the drafted token (the bonus row)
TEMPERATURE = 1.0


def _q_row() -> SparseDist:
    return SparseDist(torch.arange(6).view(1, -1), Q.view(1, -1), 6)


def _one_round(seed: int) -> int:
    """The first committed token of a split round: draft x ~ q, edge tests it, device corrects."""
    params = SamplingParams(temperature=TEMPERATURE, seed=seed)
    x = sampling.sample(Q.view(1, -1), sampling.generator_for(seed, sampling.STREAM_DRAFT, 0))  # [1]
    edge_gen = sampling.generator_for(seed, sampling.STREAM_VERIFY, 0)
    verdict = split.verify_split(Exact(), x, Q[x].float(), torch.stack([P, P_NEXT]), params, edge_gen,
                                 lambda rows: rows)
    if verdict.correction_p is None:
        return verdict.tokens[0]
    gen = split.correction_generator(seed, 0, 1, TEMPERATURE)
    return split.draw_correction(verdict.correction_p, _q_row(), gen, TEMPERATURE)


def _pvalue() -> float:
    counts = torch.bincount(torch.tensor([_one_round(s) for s in range(DRAWS)]), minlength=6).double()
    expected = P.double() * DRAWS
    keep = expected > 0
    if bool((counts[~keep] > 0).any()):
        return 0.0  # a token of p = 0 was committed
    stat = float((((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


def test_a_split_round_commits_tokens_distributed_as_p():
    assert _pvalue() > SIGNIFICANCE


def _inverted_accept(draft_tokens, draft_probs, target_probs, generator, temperature):
    """Mutation: accept with min(1, q/p), the inversion a public DSSD implementation ships."""
    g = draft_tokens.numel()
    p_x = target_probs[torch.arange(g), draft_tokens].float()
    u = sampling.uniform(g, generator)
    return (u * p_x < draft_probs.float()).tolist()


def _residual_without_q(target_probs, draft_probs):
    """Mutation: the device ignores q_j (draws the correction from p_j itself)."""
    return target_probs.float()


def _residual_inverted(target_probs, draft_probs):
    """Mutation: norm(max(q - p, 0)) instead of norm(max(p - q, 0))."""
    diff = (draft_probs.float() - target_probs.float()).clamp_min(0.0)
    return diff / diff.sum(dim=-1, keepdim=True)


def _top2_support(target_row):
    """Mutation: a truncated p_j (its top 2 only, renormalised) that misses token 2, where p > q."""
    vals, ids = torch.topk(target_row.float(), 2)
    order = ids.argsort()
    return SparseDist(ids[order].view(1, -1), (vals / vals.sum())[order].view(1, -1), target_row.numel())


@pytest.mark.parametrize("attr,mutant", [
    ("exact_tests", _inverted_accept), ("residual", _residual_without_q),
    ("residual", _residual_inverted), ("target_support", _top2_support),
], ids=["inverted-ratio", "residual-ignores-q", "residual-inverted", "p-misses-a-token-where-p>q"])
def test_each_mutation_is_caught(monkeypatch, attr, mutant):
    monkeypatch.setattr(split, attr, mutant)
    assert _pvalue() < SIGNIFICANCE


def test_the_support_covers_every_token_the_residual_needs():
    """What the edge sends: every token with p > 0, values bit for bit (so any q's residual is
    exact); one entry at temperature 0, k under top-k."""
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(1))
    for temperature, top_k, width in ((0.0, 0, 1), (0.8, 7, 7), (1.0, 0, 300)):
        p = sampling.warp_logits(logits, temperature, top_k)[0]  # [V]
        s = split.target_support(p)
        assert s.width == width and torch.equal(s.to_dense()[0], p)
    truncated = _top2_support(P)
    assert bool(((P > Q) & (truncated.to_dense()[0] == 0)).any())  # the mutant above really misses one


def test_split_accept_tests_draw_what_target_side_verification_draws():
    """Same generator, same q(x): the very outcomes of ``runtime.verify.chain_tests``."""
    gen = torch.Generator().manual_seed(2)
    for trial in range(50):
        g = 4
        p = torch.softmax(torch.randn(g + 1, 20, generator=gen), -1)
        q = torch.softmax(torch.randn(g, 20, generator=gen), -1)
        tokens = torch.multinomial(q, 1, generator=gen).view(-1)
        dist = SparseDist(torch.arange(20).expand(g, 20), q, 20)
        want, q_x = chain_tests(tokens, dist, p, torch.Generator().manual_seed(trial), 1.0)
        got = split.exact_tests(tokens, q_x, p, torch.Generator().manual_seed(trial), 1.0)
        assert got == want


def test_forced_outcomes():
    """q(x) <= p(x) always accepts; p(x) = 0 always rejects, and the correction then never is x."""
    params = SamplingParams(temperature=1.0)
    for seed in range(20):
        sure = split.verify_split(Exact(), torch.tensor([0]), torch.tensor([0.1]), torch.stack([P, P_NEXT]),
                                  params, torch.Generator().manual_seed(seed), lambda r: r)
        assert sure.accepted == 1 and sure.correction_p is None and len(sure.tokens) == 2
        never = split.verify_split(Exact(), torch.tensor([5]), torch.tensor([0.2]), torch.stack([P, P_NEXT]),
                                   params, torch.Generator().manual_seed(seed), lambda r: r)
        assert never.accepted == 0 and never.tokens == []
        token = split.draw_correction(never.correction_p, _q_row(), torch.Generator().manual_seed(seed), 1.0)
        assert token != 5 and P[token] > Q[token]


def test_greedy_split_takes_the_argmax():
    logits = torch.full((2, 8), -30.0)
    logits[0, 3] = 30.0
    warp = lambda r: sampling.warp_logits(r, 0.0)  # noqa: E731
    verdict = split.verify_split(Exact(), torch.tensor([4]), torch.tensor([1.0]), logits, SamplingParams(), None, warp)
    assert verdict.accepted == 0 and verdict.correction_p.width == 1  # one entry down
    q_row = SparseDist(torch.tensor([[4]]), torch.ones(1, 1), 8)
    assert split.draw_correction(verdict.correction_p, q_row, None, 0.0) == 3


def test_verification_mode_names_the_bad_value():
    assert split.verification_mode({}) == "target"
    assert split.verification_mode({"verification": "split"}) == "split"
    with pytest.raises(ValueError, match="'edge'"):
        split.verification_mode({"verification": "edge"})
