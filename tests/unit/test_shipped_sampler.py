"""The shipped draft worker and stage, statistically: a round's committed tokens follow the target.

These drive the real ``DraftWorker.propose`` and ``TargetStage.step`` (the code that ships, through
the same wire round trip as every backend), in a setting where later siblings of a tree are accepted
(a dense, noisy draft), and check the probability integral transform of every committed token given
its prefix: under the target's autoregressive distribution the transformed values are i.i.d.
uniform (Kolmogorov-Smirnov). The power tests break the code the classic ways (siblings shipped with
the shared q, the inverted ratio, no residual update, the bonus from the wrong row) and require the
same check to fail, so a passing suite means something.
"""
from __future__ import annotations

import pytest
import torch
from shipped_stats import follows, target_p

from specmesh.actors import draft as draft_module
from specmesh.runtime import codec, tree as tree_module, verify as verify_module
from specmesh.runtime.messages import OpenSession, ProposeRequest, SamplingParams
from specmesh.runtime.sparse import SparseDist

torch.set_num_threads(1)
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7]
ROUNDS = 1500
SIGNIFICANCE = 1e-3  # a correct sampler fails once in a thousand runs; a broken one must fail
TEMPERATURE = 1.0  # the models' own distributions: later siblings of a dense tree are accepted


def _rounds(workers, policy: dict, gamma: int, width: int, n: int = ROUNDS):
    """Runs ``n`` one-round sessions (seeds 0..n-1); yields each verdict."""
    draft, stage = workers
    for seed in range(n):
        sid = f"s{seed}"
        opened = OpenSession(sid, SamplingParams(temperature=TEMPERATURE, seed=seed), policy)
        draft.open(opened)
        stage.open(opened)
        try:
            proposal = draft.propose(ProposeRequest(sid, 1, 0, PROMPT, gamma, 0, width, []))
            wire = codec.decode(codec.encode(proposal), vocab_size=draft.vocab_size)
            yield stage.step(wire)
        finally:
            draft.close(sid)
            stage.close(sid)


def _pvalues(workers, policy: dict, gamma: int, width: int) -> tuple[float, float, float]:
    """Three checks of the rounds' committed tokens against the target:

    - chi-square of the first committed token against p after the prompt (pooling cells expected
      below 5): the sharpest check, every round contributes;
    - Kolmogorov-Smirnov of the randomised probability integral transform of every committed token
      given its prefix (uniform under the target's autoregressive distribution);
    - and the share of rounds in which a sibling other than the first was accepted at depth 0.
    """
    _, stage = workers
    memo: dict = {}
    verdicts = list(_rounds(workers, policy, gamma, width))
    later = sum(1 for v in verdicts if v.path and v.path[0] != 0)
    first_p, pit_p = follows([v.tokens for v in verdicts], lambda prefix: target_p(stage, prefix, memo, TEMPERATURE),
                             PROMPT)
    return first_p, pit_p, later / ROUNDS


DENSE = {"sparsifier": "dense", "acceptance": "exact"}
TOP8 = {"sparsifier": "top-k", "sparse_k": 8, "acceptance": "exact"}



@pytest.mark.parametrize("policy,gamma,width", [(DENSE, 2, 3), (TOP8, 2, 3), (DENSE, 3, 1)],
                         ids=["dense-tree", "top8-tree", "dense-chain"])
def test_committed_tokens_follow_the_target(workers, policy, gamma, width):
    _check_distribution(workers, policy, gamma, width)


def _check_distribution(workers, policy, gamma, width):
    first, pit, later = _pvalues(workers, policy, gamma, width)
    assert first > SIGNIFICANCE and pit > SIGNIFICANCE, (first, pit)
    if width > 1 and policy is DENSE:
        assert later > 0.05, f"later siblings accepted in only {later:.1%} of rounds: the test lacks power"


def _shared_q_siblings(q, num, generator, replacement=False, quantise=None):
    """Mutation: distinct siblings, each shipped with the node's shared q."""
    tokens, rows = _REAL_SAMPLE_SIBLINGS(q, num, generator, replacement, quantise)
    shared = rows.row(0)
    return tokens, SparseDist.concat([shared] * tokens.numel())


def _inverted_chain_tests(draft_tokens, draft_q, target_probs, generator, temperature):
    """Mutation: accept with min(1, q/p) instead of min(1, p/q)."""
    gamma = draft_tokens.numel()
    p_x = target_probs[torch.arange(gamma), draft_tokens].float()
    q_x = draft_q.prob_of(draft_tokens)
    u = torch.rand(gamma, generator=generator)
    return (u * p_x < q_x).tolist(), q_x


def _no_residual(target_probs, draft_probs):
    """Mutation: the correction is drawn from p itself, not from norm(max(p - q, 0))."""
    return target_probs.float()


def _wrong_bonus_row(accepted, draft_tokens, draft_q, target_probs, generator, temperature):
    """Mutation: after full acceptance the bonus comes from p at the last drafted position."""
    gamma = draft_tokens.numel()
    if accepted == gamma and gamma:
        rows = torch.cat([target_probs[:gamma], target_probs[gamma - 1 : gamma]])
        return _REAL_FINISH(accepted, draft_tokens, draft_q, rows, generator, temperature)
    return _REAL_FINISH(accepted, draft_tokens, draft_q, target_probs, generator, temperature)


_REAL_SAMPLE_SIBLINGS = tree_module.sample_siblings
_REAL_FINISH = verify_module.finish_chain


def test_the_bonus_comes_from_the_row_after_the_last_candidate():
    """Forced rows through the verifier every rule runs: the drafted token is certain, so it is
    accepted, and the bonus must be drawn from p after it (row 1), never from row 0."""
    from specmesh.policies.acceptance import Exact, verify_round
    from specmesh.runtime.tree import TokenTree

    logits = torch.full((2, 8), -30.0)
    logits[0, 3] = 30.0  # p after the context: token 3
    logits[1, 5] = 30.0  # p after candidate 3: token 5
    q = SparseDist(torch.tensor([[3]]), torch.ones(1, 1), 8)
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, seed=0)
        verdict = verify_round(Exact(), TokenTree.chain(torch.tensor([3])), q, logits, params,
                               torch.Generator().manual_seed(0), lambda x: torch.softmax(x, -1))
        assert verdict.tokens == [3, 5], temperature


def _mutation_cases():
    rows = lambda workers: test_each_sibling_ships_its_own_row(workers)  # noqa: E731
    bonus = lambda workers: test_the_bonus_comes_from_the_row_after_the_last_candidate()  # noqa: E731
    return [
        pytest.param(draft_module, "sample_siblings", _shared_q_siblings, rows, id="shared-q"),
        pytest.param("specmesh.policies.acceptance", "chain_tests", _inverted_chain_tests,
                     lambda w: _check_distribution(w, DENSE, 3, 1), id="inverted-ratio"),
        pytest.param(verify_module, "residual", _no_residual,
                     lambda w: _check_distribution(w, DENSE, 3, 1), id="no-residual-chain"),
        pytest.param(tree_module, "residual", _no_residual,
                     lambda w: _check_distribution(w, DENSE, 2, 3), id="no-residual-tree"),
        pytest.param("specmesh.policies.acceptance", "finish_chain", _wrong_bonus_row, bonus,
                     id="bonus-wrong-row"),
    ]


@pytest.mark.parametrize("target,attr,mutant,check", _mutation_cases())
def test_each_classic_mutation_is_caught(workers, monkeypatch, target, attr, mutant, check):
    """Power: each classic lossiness bug, planted in the shipped code, fails one of the checks above."""
    if isinstance(target, str):
        monkeypatch.setattr(f"{target}.{attr}", mutant)
    else:
        monkeypatch.setattr(target, attr, mutant)
    with pytest.raises(AssertionError):
        check(workers)


def test_each_sibling_ships_its_own_row(workers):
    """The shipped contract, exactly: sibling j's row is q with siblings 0..j-1 removed and
    renormalised (as the wire rounds it), never the shared q."""
    draft, _ = workers
    opened = OpenSession("rows", SamplingParams(temperature=1.0, seed=3), TOP8)
    draft.open(opened)
    try:
        proposal = draft.propose(ProposeRequest("rows", 1, 0, PROMPT, 1, 0, 3, []))
    finally:
        draft.close("rows")
    dense = proposal.q.to_dense()  # [3, V]
    tokens = proposal.candidates.tolist()
    assert len(set(tokens)) == 3
    for j in range(1, 3):
        assert (dense[j, tokens[:j]] == 0).all()  # earlier siblings removed
        rest = dense[0].clone()
        rest[tokens[:j]] = 0
        assert torch.allclose(dense[j], rest / rest.sum(), atol=2e-3)  # the rest renormalised
        assert not torch.allclose(dense[j], dense[0], atol=1e-3)
