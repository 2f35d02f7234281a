"""Following the source text at the verifier: comments and docstrings (prose) apart from code."""
from __future__ import annotations

import pytest
import torch

from specmesh.actors import hf, tiny
from specmesh.actors.draft import DraftWorker
from specmesh.actors.stage import TargetStage
from specmesh.policies.code_context import BOUNDARY, CODE, PROSE, START, SourceContext, scan, token_texts
from specmesh.runtime.messages import OpenSession, ProposeRequest, SamplingParams


def kinds_of(pieces: list[str]) -> list[int]:
    state, out = START, []
    for text in pieces:
        state, kind = scan(state, text)
        out.append(kind)
    return out


P, C, B = PROSE, CODE, BOUNDARY


@pytest.mark.parametrize("pieces, want", [
    # a comment: the '#' opens it (boundary), its words are prose, the newline closes it
    (["x", " =", " 1", "  #", " add", " one", "\n", "y"], [C, C, C, B, P, P, B, C]),
    # a docstring: the opening and closing triple quotes are boundaries, the text between prose
    (["def", " f", "():", "\n   ", ' """', "Return", " the", " sum", ".", '"""', "\n   ", " return"],
     [C, C, C, C, B, P, P, P, P, B, C, C]),
    # triple quotes split over tokens, single quotes likewise
    (['"', '"', '"', "a", "'''", '"', '"', '"', "b"], [C, C, B, P, P, P, P, B, C]),
    (["'''", "doc", "'''"], [B, P, B]),
    # a one-line string literal is code, whatever it holds (a '#' in it starts no comment)
    (["y", " =", " '#", " the", "'", " #", " c"], [C, C, C, C, C, B, P]),
    (["s", "=", "'it\\'s", " the", "'", " x"], [C, C, C, C, C, C]),
    (['""', " #", " c"], [C, B, P]),  # an empty literal, then a comment
    # a docstring with an escaped quote inside stays open; a newline ends an unclosed literal
    (['"""', 'a \\"""', " b", '"""'], [B, P, P, B]),
    (["'abc", "\n", "#", "x"], [C, C, B, P]),
    # a token spanning code and prose is a boundary
    (["x  # comment"], [B]),
])
def test_kinds(pieces, want):
    assert kinds_of(pieces) == want


def test_source_context_follows_rounds_and_rollbacks():
    vocab = ["x", " =", " 1", " #", " note", " word", "\n", "<|endoftext|>", '"""']
    texts = token_texts(vocab)
    assert token_texts(vocab) is texts
    src = SourceContext(texts)
    # round 1: prompt "x = 1", candidates " #", " note", " word"
    assert src.kinds(0, [0, 1, 2], torch.tensor([3, 4, 5])).tolist() == [B, P, P]
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
