"""The lossless core, four ways: forced logits, seeded determinism, the analytic identity, statistics."""
from __future__ import annotations

import math

import pytest
import torch

from specmesh.runtime import sparse
from specmesh.runtime.sampling import generator_for, sample, warp_logits
from specmesh.runtime.codec import quantise_sparse
from specmesh.runtime.sparse import SparseDist
from specmesh.runtime.verify import residual, verify_exact, verify_greedy

torch.set_num_threads(1)
V = 12  # vocabulary of the synthetic distributions


def _dists(seed: int, rows: int, sharp: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, V, generator=g) * sharp, dim=-1)  # [rows, V]


# ---------- forced logits ----------

def _one_hot_logits(tokens: list[int]) -> torch.Tensor:
    logits = torch.full((len(tokens), V), float("-inf"))
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 0.0
    return logits


def test_forced_logits_accept_all_then_bonus():
    draft = torch.tensor([3, 5, 7])
    q = sparse.dense(warp_logits(_one_hot_logits([3, 5, 7]), 1.0))
    p = warp_logits(_one_hot_logits([3, 5, 7, 9]), 1.0)  # [4, V]
    v = verify_exact(draft, q, p, torch.Generator().manual_seed(0))
    assert v.accepted == 3 and v.tokens == [3, 5, 7, 9] and v.accepted_mask == [True] * 3


def test_forced_logits_reject_second_and_correct():
    draft = torch.tensor([3, 5, 7])
    q = sparse.dense(warp_logits(_one_hot_logits([3, 5, 7]), 1.0))
    p = warp_logits(_one_hot_logits([3, 6, 7, 9]), 1.0)
    v = verify_exact(draft, q, p, torch.Generator().manual_seed(0))
    assert v.accepted == 1 and v.tokens == [3, 6] and v.accepted_mask == [True, False, False]


def test_forced_token_outside_truncated_q_is_never_accepted_wrongly():
    # p puts all mass on a token that top-1 q does not list: reject, correct to p's token.
    draft = torch.tensor([2])
    q = sparse.top_k(_dists(0, 1), 1)
    draft = q.indices[:, 0]
    other = (int(draft[0]) + 1) % V
    p = warp_logits(_one_hot_logits([other, 0]), 1.0)
    v = verify_exact(draft, q, p, torch.Generator().manual_seed(0))
    assert v.tokens == [other]


def test_greedy_matches_argmax_chain():
    p = _dists(1, 5)
    argmax = p.argmax(-1)
    draft = argmax[:4].clone()
    draft[2] = (draft[2] + 1) % V
    v = verify_greedy(draft, p)
    assert v.accepted == 2 and v.tokens == argmax[:3].tolist()
    assert verify_greedy(argmax[:4], p).tokens == argmax.tolist()


def test_zero_candidates_samples_from_p():
    p = _dists(2, 1)
    v = verify_exact(torch.zeros(0, dtype=torch.int64), SparseDist.empty(V), p, generator_for(0, 1, 0))
    assert v.accepted == 0 and len(v.tokens) == 1


# ---------- determinism ----------

def test_seeded_verification_repeats_exactly():
    p, qd = _dists(3, 7), _dists(4, 6)
    q = sparse.top_k(qd, 4)
    draft = torch.stack([q.indices[i, 0] for i in range(6)])
    runs = [verify_exact(draft, q, p, generator_for(7, 1, 11)) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


def test_generator_for_is_keyed_not_sequential():
    a = torch.rand(3, generator=generator_for(1, 0, 5))
    assert torch.equal(a, torch.rand(3, generator=generator_for(1, 0, 5)))
    assert not torch.equal(a, torch.rand(3, generator=generator_for(1, 1, 5)))
    assert not torch.equal(a, torch.rand(3, generator=generator_for(1, 0, 6)))


# ---------- the analytic identity ----------

@pytest.mark.parametrize("truncate", ["dense", "top3", "top-p0.8"])
def test_acceptance_plus_residual_is_p(truncate):
    p = _dists(5, 4)[:, :]  # [4, V]
    qd = _dists(6, 4)
    q = {"dense": sparse.dense(qd), "top3": sparse.top_k(qd, 3), "top-p0.8": sparse.top_p(qd, 0.8)}[truncate]
    qq = q.to_dense()
    overlap = torch.minimum(p, qq)
    recon = overlap + (1 - overlap.sum(-1, keepdim=True)) * residual(p, qq)
    assert torch.allclose(recon, p, atol=1e-6)


# ---------- statistics ----------

def _chi2_critical(df: int) -> float:
    # Wilson-Hilferty approximation of the chi-square 99.9% quantile (z = 3.09).
    z = 3.09
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("truncate", ["dense", "top-k", "top-p", "wire"])
def test_first_token_distribution_is_p(truncate):
    """Exact verification's first committed token ~ p_0, whatever the truncation of q."""
    p = _dists(8, 3, sharp=1.5)  # [gamma + 1, V], gamma = 2
    qd = _dists(9, 2, sharp=2.5)
    make = {
        "dense": lambda: sparse.dense(qd),
        "top-k": lambda: sparse.top_k(qd, 3),
        "top-p": lambda: sparse.top_p(qd, 0.7),
        "wire": lambda: quantise_sparse(sparse.top_k(qd, 4)),
    }
    q = make[truncate]()
    n = 6000
    counts = torch.zeros(V)
    accepted = 0
    for i in range(n):
        g = generator_for(123, 0, i)
        draft = torch.stack([q.indices[r, sample(q.probs[r : r + 1], g)[0]] for r in range(2)])
        v = verify_exact(draft, q, p, generator_for(123, 1, i))
        counts[v.tokens[0]] += 1
        accepted += v.accepted
    expected = p[0] * n
    keep = expected > 5  # chi-square needs expected counts above ~5; pool the rest
    chi2 = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum()
    rest_o, rest_e = counts[~keep].sum(), expected[~keep].sum()
    if rest_e > 0:
        chi2 += (rest_o - rest_e) ** 2 / rest_e
    df = int(keep.sum()) - (0 if rest_e > 0 else 1)
    assert chi2 < _chi2_critical(df), f"chi2 {chi2:.1f} over df {df}"
    assert accepted > 0  # the test exercised acceptance, not only corrections


def test_statistical_test_detects_a_wrong_sampler():
    """The chi-square bound above is tight enough to catch the classic min(1, q/p) inversion."""
    p = _dists(8, 2, sharp=1.5)
    qd = _dists(9, 1, sharp=2.5)
    q = sparse.dense(qd)
    n = 6000
    counts = torch.zeros(V)
    for i in range(n):
        g = generator_for(5, 0, i)
        x = sample(qd, g)
        u = torch.rand(1, generator=generator_for(5, 1, i))
        ratio = (qd[0, x] / p[0, x]).clamp(max=1)  # inverted: not lossless
        if u < ratio:
            counts[x] += 1
        else:
            counts[sample(residual(p[:1], q.to_dense()), g)] += 1
    expected = p[0] * n
    keep = expected > 5
    chi2 = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum()
    assert chi2 > _chi2_critical(int(keep.sum()) - 1)


def test_warp_top_p_and_top_k():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = warp_logits(logits, 1.0, top_k=2)
    assert (probs[0, 2:] == 0).all() and torch.isclose(probs.sum(), torch.tensor(1.0))
    probs = warp_logits(logits, 1.0, top_p=0.5)
    assert probs[0, 0] == 1.0
    assert torch.equal(warp_logits(logits, 0.0), torch.tensor([[1.0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="temperature"):
        warp_logits(logits, -1.0)
