"""Top-K sparse q over the wire keeps exact verification lossless and the acceptance rate near dense q.

One drafted position per round (gamma = 1) so that the first committed token of a round must be
distributed exactly as p. Every round's draws come from ``generator_for(seed, stream, round)``, the
same for the sparse and the dense pipeline. q goes through the real codec: the draft samples from
``quantise_fp16(q)`` and the verifier uses the q decoded from the frame.
"""
from __future__ import annotations

import math

import pytest
import torch

from specmesh.runtime.codec import decode, encode
from specmesh.runtime.messages import DraftProposal
from specmesh.runtime.sampling import STREAM_DRAFT, STREAM_VERIFY, generator_for
from specmesh.runtime.sparse import SparseDist, dense, quantise_fp16, top_k
from specmesh.runtime.verify import verify_exact

VOCAB = 32
ROUNDS = 10_000
CONTROL_ROUNDS = 2_000  # the lossy control is off by chi-square ~10x the critical value: fewer suffice
TOP_K = 8
SEED = 1234
# Two-sided z for a false alarm below 1e-5 per assertion (the seed is fixed, so the test is
# deterministic; this only says how unlucky a seed would have to be).
Z = 4.5
CHI2_Z = 3.719  # one-sided normal quantile for a 1e-4 chi-square false alarm
MIN_EXPECTED = 5.0  # chi-square cells with fewer expected counts are pooled


def distributions() -> tuple[torch.Tensor, torch.Tensor]:
    """A target p ``[V]`` and a draft q ``[V]`` that is correlated with p but more concentrated."""
    gen = torch.Generator().manual_seed(SEED)
    target_logits = 1.5 * torch.randn(VOCAB, generator=gen)
    draft_logits = 3.0 * target_logits + torch.randn(VOCAB, generator=gen)
    return torch.softmax(target_logits, -1), torch.softmax(draft_logits, -1)


def over_the_wire(q_sent: SparseDist) -> SparseDist:
    """The q the verifier gets: encode a proposal carrying ``q_sent``, decode it."""
    candidate = q_sent.indices[:, :1].reshape(-1)
    frame = encode(DraftProposal("session", 0, 0, [0], candidate, q_sent))
    return decode(frame, vocab_size=VOCAB).q


def run(q_sampled: SparseDist, q_verified: SparseDist, p: torch.Tensor,
        rounds: int = ROUNDS) -> tuple[float, torch.Tensor]:
    """Seeded rounds; returns the acceptance rate and the counts ``[V]`` of each round's first token."""
    target_probs = p.expand(2, VOCAB)  # [gamma + 1, V]: same p at the drafted and the bonus position
    cdf = torch.cumsum(q_sampled.probs[0].double(), 0)  # [k]; inverse-CDF draw, cheaper than multinomial
    counts = torch.zeros(VOCAB, dtype=torch.int64)
    accepted = 0
    for r in range(rounds):
        u = float(torch.rand(1, generator=generator_for(SEED, STREAM_DRAFT, r))) * float(cdf[-1])
        pick = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True)),
                   cdf.numel() - 1)
        draft = q_sampled.indices[0, pick].view(1)  # [1]
        verdict = verify_exact(draft, q_verified, target_probs, generator_for(SEED, STREAM_VERIFY, r))
        accepted += verdict.accepted
        counts[verdict.tokens[0]] += 1
    return accepted / rounds, counts


def chi_square_exceeds(counts: torch.Tensor, p: torch.Tensor) -> tuple[bool, float, float]:
    """Pearson chi-square of ``counts`` against ``p``; True when above the 1e-4 critical value.

    The critical value uses the Wilson-Hilferty approximation (accurate to ~1% for df >= 10).
    """
    expected = p.double() * counts.sum()
    small = expected < MIN_EXPECTED
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    critical = df * (1 - 2 / (9 * df) + CHI2_Z * math.sqrt(2 / (9 * df))) ** 3
    return stat > critical, stat, critical


@pytest.fixture(scope="module")
def outcomes():
    torch.set_num_threads(1)
    p, q = distributions()
    q_sparse = quantise_fp16(top_k(q.view(1, -1), TOP_K))  # what the draft samples from
    q_dense = quantise_fp16(dense(q.view(1, -1)))
    received_sparse, received_dense = over_the_wire(q_sparse), over_the_wire(q_dense)
    assert torch.equal(received_sparse.probs, q_sparse.probs)  # the verifier sees what was sampled
    assert torch.equal(received_dense.probs, q_dense.probs)
    return {
        "p": p,
        "mass_kept": float(torch.topk(q, TOP_K).values.sum()),
        "expected_sparse": float(torch.minimum(p, received_sparse.to_dense()[0]).sum()),
        "expected_dense": float(torch.minimum(p, received_dense.to_dense()[0]).sum()),
        "sparse": run(q_sparse, received_sparse, p),
        "dense": run(q_dense, received_dense, p),
        "q_top2": quantise_fp16(top_k(q.view(1, -1), 2)),
        "q_dense": received_dense,
    }


def test_acceptance_rates_match_their_expectation(outcomes):
    # Each round accepts with probability sum_x min(p(x), q(x)) (Leviathan et al.); the estimate of a
    # Bernoulli rate a over n rounds has standard deviation sqrt(a (1 - a) / n).
    for name in ("sparse", "dense"):
        rate, expected = outcomes[name][0], outcomes[f"expected_{name}"]
        sigma = math.sqrt(expected * (1 - expected) / ROUNDS)
        assert abs(rate - expected) <= Z * sigma, (name, rate, expected)


def test_top_k_acceptance_is_close_to_dense(outcomes):
    # |sum min(p, q_K) - sum min(p, q)| <= sum |q_K - q| = 2 (1 - mass kept): min(p, .) is
    # 1-Lipschitz per token, and renormalising the top K moves exactly the dropped mass. Both rates
    # are estimated from n rounds, so their difference has standard deviation <= sqrt(1 / (2 n)).
    mass_kept = outcomes["mass_kept"]
    assert mass_kept > 0.95, "the draft is meant to be concentrated"
    analytic = 2 * (1 - mass_kept)
    assert abs(outcomes["expected_sparse"] - outcomes["expected_dense"]) <= analytic + 1e-6
    tolerance = analytic + Z * math.sqrt(1 / (2 * ROUNDS))
    gap = abs(outcomes["sparse"][0] - outcomes["dense"][0])
    assert gap <= tolerance, (outcomes["sparse"][0], outcomes["dense"][0], tolerance)


@pytest.mark.parametrize("name", ["sparse", "dense"])
def test_output_distribution_is_the_target(outcomes, name):
    exceeds, stat, critical = chi_square_exceeds(outcomes[name][1], outcomes["p"])
    assert not exceeds, f"{name}: chi-square {stat:.1f} above the 1e-4 critical value {critical:.1f}"


def test_the_chi_square_check_catches_a_lossy_pipeline(outcomes):
    # Negative control: sample from top-2 but verify against the dense q (the sin the wire format
    # exists to prevent). The output is then not p, and the same check must say so.
    _, counts = run(outcomes["q_top2"], outcomes["q_dense"], outcomes["p"], CONTROL_ROUNDS)
    exceeds, stat, critical = chi_square_exceeds(counts, outcomes["p"])
    assert exceeds, f"chi-square {stat:.1f} did not exceed {critical:.1f}: the check has no power"
