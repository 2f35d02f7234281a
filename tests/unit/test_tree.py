"""Token trees: structure, masks and positions, greedy and exact multi-candidate verification.

Statistical tests compare committed tokens with p by Pearson's chi-square at significance
``SIGNIFICANCE`` (p-value from the regularised upper incomplete gamma function); acceptance rates by a
two-sided binomial z-test at the same level. Generators are seeded, so each test is deterministic; a
correct sampler fails a given seed with probability ``SIGNIFICANCE``. With ``NUM_ROUNDS`` = 1500
every expected cell count is above 5 (the toy p keeps every possible cell >= 1%), and a bias with
``sum((observed_p - p)^2 / p) >= 0.027`` on the first token (noncentrality 40, 4 degrees of freedom)
is caught with power 0.99; mutating the verifier (no residual update, correction from p, accept
against p, inverted ratio, one sibling only) fails these tests.
"""
from __future__ import annotations

import itertools
from statistics import NormalDist

import pytest
import torch

from specmesh.runtime.sparse import SparseDist, dense, top_k
from specmesh.runtime.tree import (
    ROOT,
    TokenTree,
    accepted_slots,
    sample_siblings,
    tree_attention_mask,
    tree_position_ids,
    verify_tree_exact,
    verify_tree_greedy,
)
from specmesh.runtime.verify import residual, verify_exact, verify_greedy

torch.set_num_threads(1)

VOCAB = 5
TOP_K = 3  # truncated q keeps 3 of VOCAB tokens
SIGNIFICANCE = 1e-3
NUM_ROUNDS = 1500
MODEL_SEED = 2
P_SHARPNESS = 0.5  # logit scale of the toy target: flat enough that every joint cell is >= 1%
Q_SHARPNESS = 2.0  # the toy draft is sharper, so rejections and residual updates are frequent
IMPOSSIBLE = VOCAB - 1  # the target never emits it after token 0; the dense draft still proposes it
SHAPES = {  # siblings per node at each depth, breadth-first
    "root3": [3],
    "2x2": [2, 2],
    "chain": [1, 1, 1],
}


# ----------------------------------------------------------------------------- toy models
def _table(gen: torch.Generator, sharpness: float) -> torch.Tensor:
    """``[1 + VOCAB, VOCAB]``: row 0 = first-token distribution, row ``1 + a`` = next after ``a``."""
    return torch.softmax(sharpness * torch.randn(1 + VOCAB, VOCAB, generator=gen), dim=-1)


def _models(seed: int = MODEL_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """A Markov target p and a sharper, different draft q (so that rejections are common)."""
    gen = torch.Generator().manual_seed(seed)
    p = _table(gen, P_SHARPNESS)
    p[1, IMPOSSIBLE] = 0.0  # p after token 0 rules a token out
    p /= p.sum(dim=-1, keepdim=True)
    return p, _table(gen, Q_SHARPNESS)


def _draft(shape, row, q_rows, replacement, gen, ship_shared=False):
    """The draft worker's job: a tree of siblings drawn per node (breadth-first) and their q rows.

    ``q_rows`` is the (truncated) draft table as a :class:`SparseDist`, ``row`` its row at the root;
    ``ship_shared`` breaks the contract (ships the node's q instead of each sibling's conditional q)
    to show that the statistical check catches it.
    """
    tokens, parents, rows = [], [], []
    frontier = [(ROOT, row)]
    for width in shape:
        nxt = []
        for parent, at in frontier:
            q = q_rows.row(at)
            toks, dist = sample_siblings(q, width, gen, replacement)
            for j, tok in enumerate(toks.tolist()):
                nxt.append((len(tokens), 1 + tok))
                tokens.append(tok)
                parents.append(parent)
                rows.append(q if ship_shared else dist.row(j))
        frontier = nxt
    return TokenTree(torch.tensor(tokens, dtype=torch.int64), parents), SparseDist.concat(rows)


def _target_rows(tree: TokenTree, row: int, p_table: torch.Tensor) -> torch.Tensor:
    """``[1 + g, V]``: p at the root, then p after each candidate (the Markov target)."""
    return p_table[[row] + [1 + t for t in tree.tokens.tolist()]]


def _first_two(shape, p_table, q_rows, replacement, gen_d, gen_v, ship_shared=False):
    """First two committed tokens of a generation (a second round when the first commits one)."""
    out: list[int] = []
    row = 0
    while len(out) < 2:
        tree, q = _draft(shape, row, q_rows, replacement, gen_d, ship_shared)
        out += verify_tree_exact(tree, q, _target_rows(tree, row, p_table), gen_v).tokens
        row = 1 + out[-1]
    return out[0], out[1]


def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson goodness of fit; cells with probability 0 must be empty (else p-value 0)."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    possible = probs > 0
    if counts[~possible].sum() > 0:
        return 0.0
    expected = probs[possible] * counts.sum()
    assert expected.min() > 5, "too few rounds for the chi-square approximation"
    stat = ((counts[possible] - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(possible.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


def _sampled_pvalues(shape, truncate, replacement, ship_shared=False, seed=1):
    """p-values of the first token's marginal and of the first two tokens' joint against p."""
    p_table, q_table = _models()
    q_rows = truncate(q_table)
    gen_d = torch.Generator().manual_seed(seed)
    gen_v = torch.Generator().manual_seed(seed + 1)
    joint = torch.zeros(VOCAB, VOCAB)
    for _ in range(NUM_ROUNDS):
        a, b = _first_two(shape, p_table, q_rows, replacement, gen_d, gen_v, ship_shared)
        joint[a, b] += 1
    want = p_table[0][:, None] * p_table[1:]  # [V, V]: p(a) p(b | a)
    return _chi_square_pvalue(joint.sum(1), p_table[0]), _chi_square_pvalue(joint, want)


def _truncation(name: str):
    return dense if name == "dense" else (lambda probs: top_k(probs, TOP_K))


# ----------------------------------------------------------------------------- structure
def _example_tree() -> TokenTree:
    #        root
    #       /    \
    #      0      1
    #     / \     |
    #    2   3    4
    #    |
    #    5
    return TokenTree(torch.tensor([10, 11, 12, 13, 14, 15]), [-1, -1, 0, 0, 1, 2])


def test_tree_structure():
    tree = _example_tree()
    assert tree.num_candidates == 6
    assert tree.depths == [0, 0, 1, 1, 1, 2]
    assert tree.children(ROOT) == [0, 1]
    assert tree.children(0) == [2, 3]
    assert tree.children(5) == []
    assert tree.path_to(5) == [0, 2, 5]
    assert tree.path_to(4) == [1, 4]
    assert tree.path_to(ROOT) == []
    assert TokenTree.chain(torch.tensor([7, 8, 9])).parents == [-1, 0, 1]


@pytest.mark.parametrize(
    "tokens, parents, error",
    [
        (torch.tensor([1, 2]), [-1, 1], ValueError),  # a node as its own parent
        (torch.tensor([1, 2]), [1, -1], ValueError),  # child before parent
        (torch.tensor([1, 2]), [-2, 0], ValueError),
        (torch.tensor([1, 2]), [-1], ValueError),
        (torch.tensor([[1, 2]]), [-1, 0], TypeError),
        (torch.tensor([1.0, 2.0]), [-1, 0], TypeError),
    ],
)
def test_tree_validation(tokens, parents, error):
    with pytest.raises(error):
        TokenTree(tokens, parents)


def test_chain_mask_and_positions_are_causal():
    num_cached, num_context, gamma = 3, 2, 4
    parents = TokenTree.chain(torch.arange(gamma)).parents
    n_new, total = num_context + gamma, num_cached + num_context + gamma
    mask = tree_attention_mask(parents, num_cached=num_cached, num_context=num_context)
    causal = torch.full((total, total), torch.finfo(torch.float32).min).triu(1)[num_cached:]
    assert mask.shape == (1, 1, n_new, total)
    assert torch.equal(mask[0, 0], causal)
    positions = tree_position_ids(parents, num_cached=num_cached, num_context=num_context)
    assert torch.equal(positions, torch.arange(num_cached, total)[None])


def test_tree_mask_and_positions_cell_by_cell():
    tree = _example_tree()
    mask = tree_attention_mask(tree.parents, num_cached=2, num_context=2, dtype=torch.bfloat16)
    #            cache  ctx    candidates 0..5
    visible = [
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # context 0
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # context 1
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # cand 0
        [1, 1, 1, 1, 0, 1, 0, 0, 0, 0],  # cand 1
        [1, 1, 1, 1, 1, 0, 1, 0, 0, 0],  # cand 2 (parent 0)
        [1, 1, 1, 1, 1, 0, 0, 1, 0, 0],  # cand 3 (parent 0)
        [1, 1, 1, 1, 0, 1, 0, 0, 1, 0],  # cand 4 (parent 1)
        [1, 1, 1, 1, 1, 0, 1, 0, 0, 1],  # cand 5 (parent 2)
    ]
    hidden = torch.finfo(torch.bfloat16).min
    want = torch.where(torch.tensor(visible, dtype=torch.bool), 0.0, hidden).to(torch.bfloat16)
    assert mask.dtype == torch.bfloat16
    assert torch.equal(mask[0, 0], want)
    positions = tree_position_ids(tree.parents, num_cached=2, num_context=2)
    assert positions.tolist() == [[2, 3, 4, 4, 5, 5, 5, 6]]
    assert accepted_slots([0, 2], num_cached=2, num_context=2).tolist() == [0, 1, 2, 3, 4, 6]


# ----------------------------------------------------------------------------- greedy
def _one_hot_rows(argmax: list[int]) -> torch.Tensor:
    """``[len(argmax), V]`` forced target: all mass on the given token (logits +-inf)."""
    logits = torch.full((len(argmax), VOCAB), float("-inf"))
    logits[torch.arange(len(argmax)), torch.tensor(argmax)] = 0.0
    return torch.softmax(logits, dim=-1)


def test_greedy_follows_the_matching_branch():
    # candidates 0..5 carry tokens 0, 1, 2, 3, 1, 4; p says 1 at the root, then 1, then 3.
    tree = TokenTree(torch.tensor([0, 1, 2, 3, 1, 4]), [-1, -1, 0, 0, 1, 2])
    p = _one_hot_rows([1, 0, 1, 0, 0, 3, 0])  # row 0 root, row 1 + i after candidate i
    verdict = verify_tree_greedy(tree, p)
    assert (verdict.accepted, verdict.path, verdict.tokens) == (2, [1, 4], [1, 1, 3])
    assert verdict.accepted_mask == [False, True, False, False, True, False]
    assert verdict.next_token == 3


def test_greedy_rejects_at_root_and_takes_first_duplicate():
    tree = TokenTree(torch.tensor([2, 2, 2]), [-1, -1, -1])
    rejected = verify_tree_greedy(tree, _one_hot_rows([3, 0, 0, 0]))
    assert (rejected.accepted, rejected.path, rejected.tokens) == (0, [], [3])
    assert rejected.accepted_mask == [False, False, False]
    duplicate = verify_tree_greedy(tree, _one_hot_rows([2, 0, 0, 0]))
    assert (duplicate.path, duplicate.tokens) == ([0], [2, 0])


def test_greedy_chain_matches_chain_verifier():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        draft = torch.randint(0, 2, (4,), generator=gen)  # small range: matches are frequent
        logits = torch.randn(5, 2, generator=gen)
        chain = verify_greedy(draft, logits)
        tree = verify_tree_greedy(TokenTree.chain(draft), logits)
        assert (tree.accepted, tree.tokens, tree.accepted_mask) == (
            chain.accepted,
            chain.tokens,
            chain.accepted_mask,
        )
        assert tree.path == list(range(chain.accepted))


# ----------------------------------------------------------------------------- exact
def test_exact_chain_repeats_chain_verifier_draw_for_draw():
    p_table, q_table = _models()
    gen = torch.Generator().manual_seed(0)
    for seed in range(50):
        tree, q = _draft([1] * 4, 0, dense(q_table), True, gen)
        p = _target_rows(tree, 0, p_table)
        chain = verify_exact(tree.tokens, q, p, torch.Generator().manual_seed(seed))
        got = verify_tree_exact(tree, q, p, torch.Generator().manual_seed(seed))
        assert (got.accepted, got.tokens, got.accepted_mask) == (
            chain.accepted,
            chain.tokens,
            chain.accepted_mask,
        )


def test_exact_with_one_hot_target_is_greedy():
    """Forced logits: with a one-hot p the exact sampler accepts exactly the argmax child."""
    _, q_table = _models()
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        tree, q = _draft([2, 2], 0, dense(q_table), True, gen)
        argmax = torch.randint(0, VOCAB, (1 + tree.num_candidates,), generator=gen).tolist()
        p = _one_hot_rows(argmax)
        assert verify_tree_exact(tree, q, p, gen).tokens == verify_tree_greedy(tree, p).tokens


def test_exact_accepts_everything_when_p_equals_q():
    p_table, _ = _models()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        tree, q = _draft([2, 2], 0, dense(p_table), True, gen)
        verdict = verify_tree_exact(tree, q, _target_rows(tree, 0, p_table), gen)
        assert verdict.path == [0, 2]  # first child at each depth, down to a leaf
        assert len(verdict.tokens) == 3


def test_exact_is_deterministic_when_seeded():
    p_table, q_table = _models()
    tree, q = _draft([3, 2], 0, top_k(q_table, TOP_K), False, torch.Generator())
    p = _target_rows(tree, 0, p_table)

    def verdicts(seed: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        return [verify_tree_exact(tree, q, p, gen).tokens for _ in range(10)]

    assert verdicts(0) == verdicts(0)
    assert verdicts(0) != verdicts(1)


def test_exact_rejects_bad_shapes():
    tree = TokenTree(torch.tensor([1, 2]), [-1, -1])
    q = dense(torch.full((2, VOCAB), 1.0 / VOCAB))
    with pytest.raises(ValueError):
        verify_tree_exact(tree, q, torch.ones(2, VOCAB), torch.Generator())  # want 3 rows
    with pytest.raises(ValueError):
        verify_tree_exact(tree, q.row(0), torch.ones(3, VOCAB), torch.Generator())


def test_sample_siblings_without_replacement():
    q = top_k(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]), TOP_K)
    tokens, rows = sample_siblings(q, 5, torch.Generator().manual_seed(0))
    assert sorted(tokens.tolist()) == [0, 1, 2]  # capped at the support of q
    dense_rows = rows.to_dense()  # [3, V]
    assert torch.allclose(dense_rows.sum(-1), torch.ones(3))
    for j, token in enumerate(tokens.tolist()):
        assert dense_rows[j, token] > 0
        assert (dense_rows[j + 1 :, token] == 0).all()  # later siblings cannot repeat it


def _exact_node(p: torch.Tensor, q: torch.Tensor, num: int, replacement: bool, ship_shared=False):
    """Exact outcome at one node with ``num`` siblings drawn from ``q``, summed over every ordered
    draw with the acceptance probabilities taken in expectation (no sampling).

    Returns:
        the first committed token's distribution ``[V]``, and P(some sibling is accepted).
    """
    out, accepted = torch.zeros(p.numel(), dtype=torch.float64), 0.0
    vocab = range(p.numel())
    draws = (
        itertools.product(vocab, repeat=num) if replacement else itertools.permutations(vocab, num)
    )
    for draw in draws:
        weight, r, rest, shipped = 1.0, p.double(), q.double(), []
        for token in draw:
            row = rest / rest.sum()  # what the draft really draws this sibling from
            weight *= float(row[token])
            shipped.append(q.double() if ship_shared else row)
            if not replacement:
                rest = rest.clone()
                rest[token] = 0.0
        for token, q_row in zip(draw, shipped):
            accept = min(1.0, float(r[token] / q_row[token]))
            out[token] += weight * accept
            accepted += weight * accept
            weight *= 1.0 - accept
            r = residual(r[None], q_row[None])[0].double()
        out += weight * r
    return out, accepted


@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without-replacement"])
def test_sibling_contract_is_exact_in_expectation(replacement):
    """Noise-free check of the draft contract: conditional rows give p, the shared row does not."""
    p_table, q_table = _models()
    p, q = p_table[0].double(), q_table[0].double()
    for num in (2, 3):
        assert torch.allclose(_exact_node(p, q, num, replacement)[0], p, atol=1e-9)
    if not replacement:
        assert not torch.allclose(_exact_node(p, q, 3, False, ship_shared=True)[0], p, atol=1e-2)


@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without-replacement"])
def test_exact_acceptance_rate_matches_theory(replacement):
    """Every sibling gets its chance: P(the root accepts one of 3 siblings) is the analytic value
    (binomial test at SIGNIFICANCE). A verifier testing only one sibling is lossless but fails here."""
    p_table, q_table = _models()
    want = _exact_node(p_table[0], q_table[0], SHAPES["root3"][0], replacement)[1]
    gen = torch.Generator().manual_seed(0)
    hits = 0
    for _ in range(NUM_ROUNDS):
        tree, q = _draft(SHAPES["root3"], 0, dense(q_table), replacement, gen)
        hits += verify_tree_exact(tree, q, _target_rows(tree, 0, p_table), gen).accepted
    z = NormalDist().inv_cdf(1 - SIGNIFICANCE / 2)
    tolerance = z * (NUM_ROUNDS * want * (1 - want)) ** 0.5
    assert abs(hits - NUM_ROUNDS * want) <= tolerance, (hits, NUM_ROUNDS * want)


def test_without_replacement_accepts_more_often():
    p_table, q_table = _models()
    iid, distinct = (_exact_node(p_table[0], q_table[0], 3, rep)[1] for rep in (True, False))
    assert distinct > iid


@pytest.mark.parametrize("shape", ["root3", "2x2"])
@pytest.mark.parametrize("truncation", ["dense", "top-k"])
@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without-replacement"])
def test_exact_tree_output_is_distributed_as_p(shape, truncation, replacement):
    first, joint = _sampled_pvalues(SHAPES[shape], _truncation(truncation), replacement)
    assert first > SIGNIFICANCE and joint > SIGNIFICANCE, (first, joint)


@pytest.mark.parametrize("truncation", ["dense", "top-k"])
def test_exact_chain_output_is_distributed_as_p(truncation):
    first, joint = _sampled_pvalues(SHAPES["chain"], _truncation(truncation), True)
    assert first > SIGNIFICANCE and joint > SIGNIFICANCE, (first, joint)


def test_wrong_contract_is_detected():
    """Power: distinct siblings shipped with their node's shared q are biased; the check says so."""
    first, joint = _sampled_pvalues(SHAPES["root3"], dense, False, ship_shared=True)
    assert first < SIGNIFICANCE, first


def test_tree_and_chain_verifiers_renormalise_q_alike():
    """Rows off by a wire rounding (sum 1.01) are renormalised by the tree verifier exactly as by
    the chain's: the same draws give the same verdict as with exact rows."""
    p_table, q_table = _models()
    q = dense(q_table[:3])
    off = SparseDist(q.indices, q.probs * 1.01, q.vocab_size)
    tokens = torch.tensor([0, 1, 2])
    p = p_table[:4]
    for seed in range(50):
        for tree in (TokenTree.chain(tokens), TokenTree(tokens, [-1, -1, -1])):
            want = verify_tree_exact(tree, q, p, torch.Generator().manual_seed(seed))
            got = verify_tree_exact(tree, off, p, torch.Generator().manual_seed(seed))
            assert got == want, (seed, tree.parents)
        chain = verify_exact(tokens, off, p, torch.Generator().manual_seed(seed))
        assert chain.tokens == verify_exact(tokens, q, p, torch.Generator().manual_seed(seed)).tokens
