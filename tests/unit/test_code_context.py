"""Following the source text at the verifier: comments and docstrings (prose) apart from code."""
from __future__ import annotations

import pytest
import torch

from specmesh.actors import hf, tiny
from specmesh.actors.draft import DraftWorker
from specmesh.actors.stage import TargetStage
from specmesh.policies.catalog import ACCEPTANCE
from specmesh.policies.code_context import BOUNDARY, CODE, LEAD, PROSE, START, SourceContext, scan, token_texts
from specmesh.policies.importance import lexical_table
from specmesh.runtime.messages import OpenSession, ProposeRequest, SamplingParams


def kinds_of(pieces: list[str]) -> list[int]:
    state, out = START, []
    for text in pieces:
        state, kind = scan(state, text)
        out.append(kind)
    return out


P, C, B, L = PROSE, CODE, BOUNDARY, LEAD


@pytest.mark.parametrize("pieces, want", [
    # a comment: the '#' opens it (boundary), its first word leads, the rest is prose, the newline
    # closes it
    (["x", " =", " 1", "  #", " add", " one", "\n", "y"], [C, C, C, B, L, P, B, C]),
    # a docstring: the opening and closing triple quotes are boundaries, the text between prose
    # (its first word, after the newline and indentation, leads)
    (["def", " f", "():", "\n   ", ' """', "\n    ", "Return", " the", " sum", ".", '"""', "\n   ", " return"],
     [C, C, C, C, B, P, L, P, P, P, B, C, C]),
    # triple quotes split over tokens, single quotes likewise
    (['"', '"', '"', "a", "'''", '"', '"', '"', "b"], [C, C, B, L, P, P, P, B, C]),
    (["'''", "doc", "'''"], [B, L, B]),
    # a one-line string literal is code, whatever it holds (a '#' in it starts no comment)
    (["y", " =", " '#", " the", "'", " #", " c"], [C, C, C, C, C, B, L]),
    (["s", "=", "'it\\'s", " the", "'", " x"], [C, C, C, C, C, C]),
    (['""', " #", " c"], [C, B, L]),  # an empty literal, then a comment
    # a docstring with an escaped quote inside stays open; a newline ends an unclosed literal
    (['"""', 'a \\"""', " b", '"""'], [B, L, P, B]),
    (["'abc", "\n", "#", "x"], [C, C, B, L]),
    # only the first piece of the first word leads; each new span leads again; a digit leads too
    (["#", " ", "Iter", "ate", " all", "\n", "#", " 2", " more"], [B, P, L, P, P, B, B, L, P]),
    # a token spanning code and prose is a boundary, its first word in it or not
    (["x  # comment"], [B]),
    (["x", " #", "\n"], [C, B, B]),  # an empty comment: no word led
])
def test_kinds(pieces, want):
    assert kinds_of(pieces) == want


def test_source_context_follows_rounds_and_rollbacks():
    vocab = ["x", " =", " 1", " #", " note", " word", "\n", "<|endoftext|>", '"""']
    texts = token_texts(vocab)
    assert token_texts(vocab) is texts
    src = SourceContext(texts)
    # round 1: prompt "x = 1", candidates " #", " note", " word"
    assert src.kinds(0, [0, 1, 2], torch.tensor([3, 4, 5])).tolist() == [B, L, P]
    # round 2: two accepted (" #", " note"), the correction " word" committed, candidates in the comment
    assert src.kinds(5, [5], torch.tensor([4, 6, 0])).tolist() == [P, B, C]
    # round 3: rollback into code before the comment: the same tokens are code/boundary again
    assert src.kinds(3, [6], torch.tensor([0, 3, 7])).tolist() == [C, B, B]  # a control token: boundary
    # inside a comment a control token is still a boundary
    assert src.kinds(5, [], torch.tensor([7])).tolist() == [B]
    # a rollback beyond what the stage saw (a stage that came back after a failure): lost track
    assert src.kinds(50, [0], torch.tensor([4])) is None
    assert src.kinds(2, [0], torch.tensor([4])) is None  # and it stays lost
    fresh = SourceContext(texts)
    assert fresh.kinds(0, [8, 4], torch.tensor([5, 8, 0])).tolist() == [P, B, C]


def _run_rounds(vocab, draft, stage_model, rounds=6):
    """Greedy rounds of the noisy tiny draft against one importance stage (strength 1, lexical
    scorer) over ``vocab``; per round (exact's count, the rule's count, drafted)."""
    stage = TargetStage(stage_model, vocab=lambda: vocab)
    exact = TargetStage(stage_model)
    sid = f"s{id(vocab)}"
    policy = {"acceptance": "importance", "importance_strength": 1.0, "importance_scorer": "lexical", "sparse_k": 8}
    for w, pol in ((draft, policy), (stage, policy), (exact, {"sparse_k": 8})):
        w.open(OpenSession(sid, SamplingParams(temperature=0.0, seed=0), pol))
    committed, told, keep, out = [2, 1, 3], 0, 0, []  # the prompt " w2 # w3" ends inside a comment
    for rnd in range(1, rounds + 1):
        msg = draft.propose(ProposeRequest(sid, rnd, told, committed[told:], 4, keep))
        told = len(committed)
        mine, ref = stage.step(msg), exact.step(msg)
        out.append((ref.accepted, mine.accepted, msg.num_candidates))
        base = len(committed)
        committed += mine.tokens
        keep = base + mine.accepted
    draft.close(sid)
    return out


def test_stage_relaxes_comment_positions_and_never_code(tmp_path):
    """The last stage follows the text from the proposals alone: after a ``#`` every drafted token
    is prose and kept (strength 1); with no ``#`` in the vocabulary the same words are code and
    verified exactly."""
    cache = tmp_path / "models"
    target = hf.load_stage(tiny.materialise("tiny", cache), dtype=torch.float32)
    draft = DraftWorker(hf.load_stage(tiny.materialise("tiny-draft:noise=0.6", cache), dtype=torch.float32))
    words = [f" w{i}" for i in range(target.vocab_size)]
    commented = list(words)
    commented[1] = " #"
    prose = _run_rounds(commented, draft, target)
    assert all(mine == g for _, mine, g in prose)
    assert any(ref < g for ref, _, g in prose), "the noisy draft should be rejected somewhere"
    code = _run_rounds(words, draft, target)
    assert all(ref == mine for ref, mine, _ in code)


def test_the_opening_word_of_a_comment_is_exact_unless_lead_is_off():
    vocab = ["x", " =", " 1", " #", " Your", " code", " here", "\n", " pass"]
    texts, table = token_texts(vocab), lexical_table(vocab)
    rounds = (0, [0, 1, 2], torch.tensor([3, 4, 5, 6, 7, 8]))  # "x = 1" then " # Your code here\n pass"
    on = ACCEPTANCE.get("importance")({"importance_strength": 1.0}, vocab)
    off = ACCEPTANCE.get("importance")({"importance_strength": 1.0, "importance_lead": False}, vocab)
    assert on.lead and not off.lead
    lex_on, prose_on = on.round_lexicon(on.source_context(), *rounds)
    lex_off, prose_off = off.round_lexicon(off.source_context(), *rounds)
    # " #" and the newline are structure, " pass" a name; " Your" leads the comment
    assert lex_on.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert lex_off.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert prose_on.tolist() == prose_off.tolist() == [False, True, True, True, False, False]
    with pytest.raises(ValueError, match="importance_lead"):
        ACCEPTANCE.get("importance")({"importance_lead": "sometimes"}, vocab)
