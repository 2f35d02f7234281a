"""Importance scorers: the lexicon from token strings, the target's confidence, their combination."""
from __future__ import annotations

import math

import pytest
import torch

from specmesh.policies.acceptance import ChainInputs
from specmesh.policies.importance import (
    distributional, lexical_score, lexical_table, over_confidence, score, target_confidence, token_text,
)


@pytest.mark.parametrize("token, text", [
    ("Ġthe", " the"), ("ĊĠĠĠ", "\n   "), ("ĉ", "\t"), ("▁the", " the"), ("plain", "plain"),
    ("ä¸Ń", "中"), ("âĢ", "\ufffd"),  # half of a UTF-8 sequence
])
def test_token_text_decodes_byte_level_and_sentencepiece(token, text):
    assert token_text(token) == text


@pytest.mark.parametrize("token, want", [
    # important: identifiers, keywords (also those that are English function words), numbers,
    # operators, special tokens, one-letter names
    ("Ġcount", 1.0), ("_x1", 1.0), ("Ġdef", 1.0), ("Ġreturn", 1.0), ("Ġand", 1.0), ("Ġin", 1.0),
    ("Ġnot", 1.0), ("42", 1.0), ("Ġ3", 1.0), ("Ġ+=", 1.0), ("==", 1.0), ("Ġ->", 1.0),
    (".append", 1.0), ("Ġi", 1.0), ("<|endoftext|>", 1.0), ("</s>", 1.0), ("中", 1.0),
    # unimportant: whitespace, newlines with indentation, punctuation, function words
    ("Ġ", 0.0), ("ĠĠĠĠ", 0.0), ("Ċ", 0.1), ("ĊĠĠĠĠĠĠĠ", 0.1), ("ĊĊ", 0.1), (",", 0.1), ("):", 0.1),
    ("Ġ(", 0.1), ('Ġ"', 0.1), ("ĠâĢĶ", 0.1), ("Ġthe", 0.1), ("ĠThe", 0.1), ("Ġof", 0.1),
    # what cannot be read sits in between
    ("âĢ", 0.5), ("", 0.5),
])
def test_lexical_classes(token, want):
    assert lexical_score(token) == pytest.approx(want)


def test_lexical_table_is_built_once_per_vocabulary():
    vocab = ["Ġthe", "Ġcount", "Ġ", "42"]
    table = lexical_table(vocab)
    assert table.tolist() == pytest.approx([0.1, 1.0, 0.0, 1.0])
    assert lexical_table(vocab) is table
    other = list(vocab)
    assert lexical_table(other) is not table and torch.equal(lexical_table(other), table)


def make_inputs(rows, tokens, temperature=0.0, q_x=None) -> ChainInputs:
    p_raw = torch.tensor(rows)
    g = len(tokens)
    return ChainInputs(torch.tensor(tokens), torch.tensor(q_x or [1.0] * g), p_raw, p_raw, [False] * g,
                       temperature)


def test_target_confidence_values():
    rows = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25] * 4, [0.9, 0.1, 0.0, 0.0]])
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert target_confidence(rows).tolist() == pytest.approx(
        [1.0, 0.25, 0.5 * 0.25, 0.5 * (0.8 + math.exp(-h))], rel=1e-5)


def test_over_confidence_only_when_sampling():
    rows = [[0.2, 0.8], [0.6, 0.4], [1.0, 0.0]]
    sampled = make_inputs(rows, [0, 0], temperature=1.0, q_x=[0.8, 0.3])
    assert over_confidence(sampled).tolist() == pytest.approx([0.75, 0.0])
    assert over_confidence(make_inputs(rows, [0, 0])).tolist() == [0.0, 0.0]
    assert distributional(sampled).tolist() == pytest.approx(
        [0.75, float(target_confidence(torch.tensor([rows[1]]))[0])], rel=1e-5)


def test_score_combines_lexicon_and_distribution():
    inp = make_inputs([[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]], [0, 0])
    lexical = torch.tensor([0.0, 0.1])
    assert score("lexical", inp, lexical).tolist() == pytest.approx([0.0, 0.1])
    assert score("distributional", inp, lexical).tolist() == pytest.approx([0.25, 1.0])
    assert score("combined", inp, lexical).tolist() == pytest.approx([0.25, 1.0])
    assert score("combined", inp, torch.tensor([1.0, 0.0])).tolist() == pytest.approx([1.0, 1.0])
    assert score("combined", inp, None).tolist() == pytest.approx([0.25, 1.0])  # no vocabulary
    with pytest.raises(ValueError, match="vocabulary"):
        score("lexical", inp, None)
    with pytest.raises(ValueError, match="importance_scorer = 'semantic'"):
        score("semantic", inp, lexical)
