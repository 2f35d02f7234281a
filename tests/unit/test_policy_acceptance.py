"""Lossy acceptance rules (typical, FLy, importance) on ChainInputs built by hand or drawn at random."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from specmesh.policies import lossy  # noqa: F401  (registers the rules)
from specmesh.policies.acceptance import ACCEPTANCE, ChainInputs, first_rejection
from specmesh.policies.lossy import Fly, ImportanceAcceptance, Typical, top3_entropy

V = 40


def random_chains(n: int, g: int, temperature: float, seed: int) -> list[ChainInputs]:
    """Chains whose exact tests are drawn as the verifier draws them (one uniform per position)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 0.5 + 3.0 * torch.rand(n, g + 1, 1, generator=gen)
    logits = scale * torch.randn(n, g + 1, V, generator=gen)  # [n, g + 1, V]
    p_raw = torch.softmax(logits, -1)
    q_logits = logits[:, :g] + 0.8 * torch.randn(n, g, V, generator=gen)  # [n, g, V]
    if temperature == 0:
        q = torch.softmax(q_logits, -1)
        x = q.argmax(-1)  # [n, g]
        p = torch.nn.functional.one_hot(p_raw.argmax(-1), V).float()
        native = x == p_raw[:, :g].argmax(-1)  # [n, g]
    else:
        p = torch.softmax(logits / temperature, -1)
        q = torch.softmax(q_logits / temperature, -1)
        x = torch.multinomial(q.reshape(n * g, V), 1, generator=gen).reshape(n, g)
        u = torch.rand(n, g, generator=gen)
        native = u * q.gather(-1, x[..., None])[..., 0] < p[:, :g].gather(-1, x[..., None])[..., 0]
    q_x = q.gather(-1, x[..., None])[..., 0]  # [n, g]
    return [ChainInputs(x[c], q_x[c], p[c], p_raw[c], native[c].tolist(), temperature) for c in range(n)]


def chain(rows: list[list[float]], tokens: list[int], native: list[bool], temperature: float = 0.0,
          q_x: list[float] | None = None, importance: list[float] | None = None) -> ChainInputs:
    """A hand-built chain: ``rows`` are the g + 1 target rows (padded with zeros to V)."""
    p_raw = torch.zeros(len(rows), V)
    for i, r in enumerate(rows):
        p_raw[i, : len(r)] = torch.tensor(r)
    p = p_raw if temperature else torch.nn.functional.one_hot(p_raw.argmax(-1), V).float()
    g = len(tokens)
    return ChainInputs(
        torch.tensor(tokens), torch.tensor(q_x or [1.0] * g), p, p_raw, native, temperature,
        None if importance is None else torch.tensor(importance),
    )


UNIMPORTANT = [0.0] * 8


# -- importance ---------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("scorer", ["combined", "distributional", "lexical"])
def test_strength_zero_is_exact(temperature, scorer):
    rule = ImportanceAcceptance(0.0, scorer, table=torch.zeros(V))  # every token lexically unimportant
    for inp in random_chains(300, 6, temperature, seed=int(temperature * 10) + len(scorer)):
        assert rule.accepted(inp) == first_rejection(inp.native)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_acceptance_rises_with_strength(temperature):
    chains = random_chains(400, 6, temperature, seed=5)
    strengths = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
    totals = []
    for s in strengths:
        rule = ImportanceAcceptance(s, "distributional")
        kept = [rule.accepted(inp) for inp in chains]
        totals.append(sum(kept))
        if s:
            assert all(k >= j for k, j in zip(kept, previous)), "a chain lost tokens as strength rose"
        previous = kept
    assert totals[0] == sum(first_rejection(c.native) for c in chains)
    assert totals[-1] > totals[0] * 1.1, totals  # the knob does something
    assert totals == sorted(totals)


def test_important_positions_are_never_relaxed():
    # Position 1 is a mismatch on a near tie: relaxable unless its lexical importance is high.
    rows = [[0.9, 0.1], [0.45, 0.55], [0.5, 0.5]]
    for lex, want in [(0.0, 2), (0.3, 2), (0.5, 1), (1.0, 1)]:
        inp = chain(rows, [0, 0], [True, False], importance=[0.0, lex])
        for scorer in ("lexical", "combined"):
            assert ImportanceAcceptance(1.0, scorer).accepted(inp) == want, (lex, scorer)
    # A confident target (0.8 margin, confidence 0.76) makes a position important whatever the lexicon.
    inp = chain([[0.9, 0.1], [0.1, 0.9], [1.0]], [0, 0], [True, False], importance=[0.0, 0.0])
    assert ImportanceAcceptance(1.0, "combined").accepted(inp) == 1
    assert ImportanceAcceptance(1.0, "lexical").accepted(inp) == 2  # lexicon alone: p/max = 1/9 > 0


def test_prose_positions_relaxed_code_positions_never():
    """Inside a comment or docstring (``prose``) the combined scorer takes the lexicon alone, so a
    confident target does not keep the position exact; a code token of high lexical importance is
    never relaxed, prose or not (a boundary token arrives with importance 1)."""
    confident = [[0.9, 0.1], [0.1, 0.9], [1.0]]  # position 1: target confident in 1, draft says 0
    for temperature in (0.0, 0.7):
        base = chain(confident, [0, 0], [True, False], temperature=temperature, q_x=[0.9, 0.1],
                     importance=[0.0, 0.0])
        prose = dataclasses.replace(base, prose=torch.tensor([False, True]))
        code = dataclasses.replace(base, prose=torch.tensor([False, False]))
        rule = ImportanceAcceptance(1.0, "combined")
        assert rule.accepted(prose) == 2
        assert rule.accepted(code) == 1  # the target's confidence keeps it exact
        assert ImportanceAcceptance(0.0, "combined").accepted(prose) == 1  # strength 0: exact
        important = dataclasses.replace(prose, importance=torch.tensor([0.0, 1.0]))
        assert rule.accepted(important) == 1


def test_prose_acceptance_rises_with_strength():
    chains = random_chains(300, 6, 1.0, seed=9)
    totals, previous = [], None
    for strength in (0.0, 0.25, 0.5, 1.0):
        rule = ImportanceAcceptance(strength, "combined")
        kept = [rule.accepted(dataclasses.replace(c, importance=torch.zeros(6), prose=torch.ones(6, dtype=torch.bool)))
                for c in chains]
        if previous is not None:
            assert all(k >= j for k, j in zip(kept, previous))
        previous = kept
        totals.append(sum(kept))
    assert totals[0] == sum(first_rejection(c.native) for c in chains)
    assert totals[-1] == 6 * len(chains)  # strength 1 keeps every prose token the warpers allow


def test_relaxed_threshold_formula():
    """Kept iff p(x) >= (1 - rho) max p with rho = strength * (1 - s / 0.5); s = 0 here (lexical)."""
    rows = [[0.4, 0.6], [1.0]]  # x = 0 has ratio 2/3 to the argmax
    inp = chain(rows, [0], [False], importance=[0.0])
    assert ImportanceAcceptance(0.34, "lexical").accepted(inp) == 1  # 1 - 0.34 = 0.66 <= 2/3
    assert ImportanceAcceptance(0.33, "lexical").accepted(inp) == 0
    half = chain(rows, [0], [False], importance=[0.25])  # rho = strength / 2
    assert ImportanceAcceptance(0.68, "lexical").accepted(half) == 1
    assert ImportanceAcceptance(0.66, "lexical").accepted(half) == 0


def test_sampling_guards():
    rows = [[0.45, 0.55], [1.0]]
    # Over-confident draft: q(x) = 3 p(x) gives over-confidence 2/3 > 0.5, so position 0 is exact.
    over = chain(rows, [0], [False], temperature=1.0, q_x=[1.0], importance=[0.0])
    assert ImportanceAcceptance(1.0, "combined").accepted(over) == 0
    mild = chain(rows, [0], [False], temperature=1.0, q_x=[0.6], importance=[0.0])
    assert ImportanceAcceptance(1.0, "combined").accepted(mild) == 1
    # A token the user's warpers removed (p = 0 after top-k) is never kept.
    cut = chain([[0.0, 1.0], [1.0]], [0], [False], temperature=1.0, q_x=[0.5], importance=[0.0])
    assert ImportanceAcceptance(1.0, "lexical").accepted(cut) == 0


def test_lexicon_from_vocabulary():
    vocab = ["Ġthe", "Ġcount", ",", "Ġ=", "ĊĠĠĠ", "42", "Ġa"] + [f"tok{i}" for i in range(V - 7)]
    rule = ACCEPTANCE.get("importance")({"importance_strength": 1.0, "importance_scorer": "lexical"}, vocab)
    assert rule.lexical(torch.tensor([0, 1, 2, 3, 4, 5, 6])).tolist() == pytest.approx(
        [0.1, 1.0, 0.1, 1.0, 0.1, 1.0, 1.0])
    near_tie = [[0.45, 0.55] + [0.0] * (V - 2)] * 2
    for token, want in [(0, 1), (2, 1), (4, 1), (1, 0), (3, 0), (5, 0)]:
        rows = [list(r) for r in near_tie]
        rows[0][token], rows[0][1 if token != 1 else 0] = 0.45, 0.55
        inp = chain(rows, [token], [False])
        assert rule.accepted(inp) == want, vocab[token]


# -- typical ------------------------------------------------------------------------------------

def test_typical_formula():
    # Row entropy H = ln 4 (uniform over 4): threshold = min(0.09, 0.3 / 4 = 0.075) = 0.075.
    flat = [0.25] * 4
    assert Typical().accepted(chain([flat, flat], [1], [False])) == 1  # 0.25 > 0.075
    # A confident row [0.95, 0.05]: H = 0.1985 nats, 0.3 e^-H = 0.246, threshold = eps = 0.09.
    sure = [0.95, 0.05]
    assert Typical().accepted(chain([sure, flat], [1], [False])) == 0  # 0.05 < 0.09
    assert Typical(eps=0.04, delta=0.2).accepted(chain([sure, flat], [1], [False])) == 1
    h = -(0.95 * math.log(0.95) + 0.05 * math.log(0.05))
    edge = 0.2 * math.exp(-h)  # 0.164: the delta term decides when eps is above it
    assert Typical(eps=0.5, delta=0.05 / edge * 0.2 * 0.999).accepted(chain([sure, flat], [1], [False])) == 1
    assert Typical(eps=0.5, delta=0.05 / edge * 0.2 * 1.001).accepted(chain([sure, flat], [1], [False])) == 0
    # Chains stop at the first position neither native nor typical; native positions always pass.
    assert Typical().accepted(chain([flat, sure, flat, flat], [1, 1, 1], [True, False, True])) == 1
    assert Typical().accepted(chain([sure, sure, flat], [1, 0], [True, True])) == 2


# -- FLy ----------------------------------------------------------------------------------------

HESITANT = [0.4, 0.35, 0.25]  # renormalised top-3 entropy 1.08 nats
SURE = [0.97, 0.02, 0.01]  # 0.15 nats


def test_top3_entropy_in_nats_renormalised():
    p = torch.zeros(2, V)
    p[0, :3] = torch.tensor([0.2, 0.2, 0.2])  # renormalised: uniform over 3
    p[1, :4] = torch.tensor([0.5, 0.25, 0.125, 0.125])
    want = -sum(v * math.log(v) for v in (4 / 7, 2 / 7, 1 / 7))  # top 3 of 0.875, renormalised
    assert top3_entropy(p).tolist() == pytest.approx([math.log(3), want], rel=1e-5)


def test_fly_defers_a_hesitant_mismatch_when_the_window_holds():
    g = 8  # W = min(6, 7) = 6
    rows = [HESITANT] * (g + 1)
    native = [True, False] + [True] * 6
    assert Fly().accepted(chain(rows, [1] * g, native)) == 8
    sure = [HESITANT, SURE] + [HESITANT] * (g - 1)
    assert Fly().accepted(chain(sure, [1] * g, native)) == 1  # entropy below 0.3: exact
    assert Fly(entropy=0.1).accepted(chain(sure, [1] * g, native)) == 8
    broken = [True, False, True, True, False, True, True, True]  # second mismatch inside the window
    assert Fly().accepted(chain(rows, [1] * g, broken)) == 1


def test_fly_window_edges():
    rows = [HESITANT] * 10
    # The full window must fit: a mismatch with fewer than W positions after it is not deferred.
    assert Fly().accepted(chain(rows, [1] * 8, [True, True, False] + [True] * 5)) == 2  # needs 6, has 5
    assert Fly(window=5).accepted(chain(rows, [1] * 8, [True, True, False] + [True] * 5)) == 8
    # Short chains: W = g - 1, so a mismatch at 0 defers on the rest; a later one cannot.
    assert Fly().accepted(chain(rows[:4], [1] * 3, [False, True, True])) == 3
    assert Fly().accepted(chain(rows[:4], [1] * 3, [True, False, True])) == 1
    assert Fly().accepted(chain(rows[:2], [1], [False])) == 0  # g = 1: W = 0, exact
    # After a kept window the scan resumes: a second deferral needs its own full window.
    g = 9
    native = [False, True, True, False, True, True, True, True, True]
    assert Fly(window=2).accepted(chain([HESITANT] * (g + 1), [1] * g, native)) == 9
    native[7] = False  # a mismatch at 7 has one position after it, not a full window of 2
    assert Fly(window=2).accepted(chain([HESITANT] * (g + 1), [1] * g, native)) == 7
    # An impossible draft token (p_raw = 0) is never kept.
    zero = [[0.0, 0.0, 0.4, 0.35, 0.25]] + [HESITANT] * 3
    assert Fly().accepted(chain(zero, [1] * 3, [False, True, True])) == 0


def test_fly_sampling_needs_positive_warped_p_and_q():
    rows = [HESITANT] * 4
    ok = chain(rows, [1] * 3, [False, True, True], temperature=1.0, q_x=[0.5, 0.5, 0.5])
    assert Fly().accepted(ok) == 3
    cut = chain([[0.6, 0.0, 0.4]] + [HESITANT] * 3, [1] * 3, [False, True, True], temperature=1.0)
    assert Fly().accepted(cut) == 0


# -- factories ----------------------------------------------------------------------------------

def test_factories_read_and_validate_options():
    t = ACCEPTANCE.get("typical")({"typical_eps": 0.05, "typical_delta": 0.2, "fly_window": "x"}, None)
    assert (t.eps, t.delta, t.lossless, t.chain_only) == (0.05, 0.2, False, True)
    f = ACCEPTANCE.get("fly")({"fly_entropy": 0.5, "fly_window": 3}, None)
    assert (f.entropy, f.window) == (0.5, 3)
    i = ACCEPTANCE.get("importance")({}, None)
    assert (i.strength, i.scorer, i.table) == (lossy.DEFAULT_STRENGTH, "combined", None)
    for name, options, key in [
        ("typical", {"typical_eps": 0.0}, "typical_eps"), ("typical", {"typical_eps": 1.5}, "typical_eps"),
        ("typical", {"typical_delta": -1}, "typical_delta"), ("typical", {"typical_delta": "x"}, "typical_delta"),
        ("fly", {"fly_window": 0}, "fly_window"), ("fly", {"fly_window": 2.5}, "fly_window"),
        ("fly", {"fly_entropy": 1.2}, "fly_entropy"), ("fly", {"fly_entropy": True}, "fly_entropy"),
        ("importance", {"importance_strength": 1.5}, "importance_strength"),
        ("importance", {"importance_strength": -0.1}, "importance_strength"),
        ("importance", {"importance_scorer": "semantic"}, "importance_scorer"),
        ("importance", {"importance_scorer": "lexical"}, "importance_scorer"),  # no vocabulary
    ]:
        with pytest.raises(ValueError, match=key):
            ACCEPTANCE.get(name)(options, None)
