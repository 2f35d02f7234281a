"""Where a drafted token falls in the source text: code, or prose (a comment, a docstring).

The per-token lexicon (:mod:`.importance`) cannot tell the words of a comment from names in code;
both look like identifiers. This module follows the text itself: a small scanner of Python-style
source (``#`` comments to the end of the line, ``'`` / ``"`` string literals, ``'''`` / ``\"\"\"``
triple-quoted strings, backslash escapes) runs over the committed tokens and the drafted ones, so
each drafted position gets a *kind*:

- ``PROSE``: every character of the token lies inside a comment or a triple-quoted string (a
  docstring), which the program does not execute;
- ``CODE``: every character is code or a one-line string literal (whose content matters);
- ``BOUNDARY``: the token opens or closes a comment or a docstring (``#``, ``\"\"\"``, the newline
  that ends a comment), or is a control token (``<|endoftext|>``): structure, so always important;
- ``LEAD``: a prose token that holds the first letter or digit of its comment or docstring: the
  opening word, which decides what the span says. In a code model's output a comment is the plan of
  the lines under it (``# Iterate over ...``, ``# Your code here`` then ``pass``), and a plan that
  starts on another word is another plan; the words after it follow where it points.

It runs where the verification runs (the last target stage) from what every round's proposal
carries there: the stage keeps the session's token ids (``rollback`` cached positions, then the
round's ``context`` and ``candidates``) and the scanner's state after every one, so a round costs a
few dictionary look-ups per new token (:meth:`SourceContext.kinds`); the texts of the vocabulary are
decoded once per vocabulary (:func:`token_texts`). When the stage's history does not cover the
round (a stage that came back after a failure), :meth:`SourceContext.kinds` returns None and the
rule falls back to the per-token lexicon.

The scanner assumes Python-like text; on other text a ``#`` starts a "comment" too, which only
widens where the relaxed rule may apply, never what counts as code inside a string literal.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence, runtime_checkable

import torch

from .importance import is_special, token_text

CODE_MODE, COMMENT, STRING, DOCSTRING = 0, 1, 2, 3
PROSE, CODE, BOUNDARY, LEAD = 0, 1, 2, 3  # kinds of a token
_PROSE_MODES = (COMMENT, DOCSTRING)
_CACHE_ENTRIES = 4
_texts: dict[int, tuple[Sequence[str], list[str]]] = {}


class LexState(NamedTuple):
    """The scanner between two characters.

    Attributes:
        mode: ``CODE_MODE``, ``COMMENT``, ``STRING`` (one-line literal) or ``DOCSTRING``.
        quote: the quote character of the literal being opened (``CODE_MODE`` with ``run``), read
            (``STRING``, ``DOCSTRING``), else "".
        run: in ``CODE_MODE``, quotes seen so far of an opening (1 or 2; 3 opens a docstring); in
            ``DOCSTRING``, closing quotes seen so far.
        escape: the previous character was a backslash inside a literal.
        opening: inside a comment or docstring whose first letter or digit is still to come.
    """

    mode: int = CODE_MODE
    quote: str = ""
    run: int = 0
    escape: bool = False
    opening: bool = True


START = LexState()


def _step(s: LexState, c: str) -> LexState:
    """The state after character ``c``."""
    mode, quote, run, escape, _ = s
    if mode == CODE_MODE:
        if run:  # an opening of ``run`` quotes so far
            if c == quote:
                return LexState(DOCSTRING, quote) if run == 2 else LexState(CODE_MODE, quote, 2)
            # one quote: a one-line literal has begun, c is its first character; two: "" closed
            return _step(LexState(STRING, quote), c) if run == 1 else _step(START, c)
        if c == "#":
            return LexState(COMMENT)
        if c in "'\"":
            return LexState(CODE_MODE, c, 1)
        return s
    if mode == COMMENT:
        return START if c == "\n" else s
    if escape:
        return LexState(mode, quote, 0)
    if c == "\\":
        return LexState(mode, quote, 0, True)
    if mode == STRING:
        return START if c in (quote, "\n") else s
    if c == quote:  # DOCSTRING: a closing run
        return START if run == 2 else LexState(DOCSTRING, quote, run + 1)
    return LexState(DOCSTRING, quote) if run else s


def _in_prose(s: LexState) -> bool:
    return s.mode in _PROSE_MODES


def scan(state: LexState, text: str) -> tuple[LexState, int]:
    """Runs ``text`` from ``state``: the state after it and its kind (``PROSE`` when every character
    stays inside a comment or docstring, ``LEAD`` when one of them is the span's first letter or
    digit, ``BOUNDARY`` when one enters or leaves a span, else ``CODE``; an empty text takes the kind
    of where it stands)."""
    prose = _in_prose(state)
    kind, lead = (PROSE if prose else CODE), False
    for c in text:
        nxt = _step(state, c)
        now = _in_prose(nxt)
        if now:
            # a span just entered is still opening; within one, the flag passes on until a letter
            opening = state.opening if prose else True
            if prose and opening and c.isalnum():
                lead, opening = True, False
            if nxt.opening != opening:
                nxt = nxt._replace(opening=opening)
        if now != prose:
            kind = BOUNDARY
        state, prose = nxt, now
    return state, (LEAD if lead and kind == PROSE else kind)


def token_texts(vocab: Sequence[str]) -> list[str]:
    """The text of every vocabulary entry (:func:`~.importance.token_text`), decoded once per
    vocabulary object (cached by identity like :func:`~.importance.lexical_table`)."""
    hit = _texts.get(id(vocab))
    if hit is not None and hit[0] is vocab:
        return hit[1]
    texts = [token_text(t) for t in vocab]
    if len(_texts) >= _CACHE_ENTRIES:
        _texts.pop(next(iter(_texts)))
    _texts[id(vocab)] = (vocab, texts)
    return texts


class SourceContext:
    """One session's scanner at the verifying stage: token ids by position and the state after each.

    Args:
        texts: the text of every token id (:func:`token_texts`).
    """

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = texts
        self.tokens: list[int] = []  # ids at positions 0..n-1 that the stage was last fed
        self.states: list[LexState] = [START]  # states[k]: after the first k tokens
        self._memo: dict[tuple[LexState, int], tuple[LexState, int]] = {}

    def _scan(self, state: LexState, token: int) -> tuple[LexState, int]:
        key = (state, token)
        hit = self._memo.get(key)
        if hit is None:
            text = self.texts[token] if 0 <= token < len(self.texts) else ""
            hit = scan(state, text)
            if is_special(text):  # a control token is structure wherever it stands
                hit = (hit[0], BOUNDARY)
            self._memo[key] = hit
        return hit

    def kinds(self, rollback: int, context: Sequence[int], candidates: torch.Tensor) -> torch.Tensor | None:
        """``[g]`` int64 kind of every candidate of a chain round, or None when the history does not
        reach ``rollback`` (the stage kept no tokens for those positions: the rule falls back to the
        per-token lexicon). Records the round's tokens, as the stage's cache does.

        Args:
            rollback: cached positions the round keeps.
            context: committed tokens at positions ``rollback...`` (the whole prompt in round 1).
            candidates: ``[g]`` int64 drafted chain after them.
        """
        if rollback > len(self.tokens):
            self.tokens, self.states = [], [START]  # lost track: stay lost until a round from 0
            return None
        del self.tokens[rollback:]
        del self.states[rollback + 1 :]
        state = self.states[-1]
        for t in context:
            state = self._scan(state, int(t))[0]
            self.tokens.append(int(t))
            self.states.append(state)
        out = []
        for t in candidates.tolist():
            state, kind = self._scan(state, t)
            out.append(kind)
            self.tokens.append(t)
            self.states.append(state)
        return torch.tensor(out, dtype=torch.int64)  # [g]


@runtime_checkable
class FollowsSource(Protocol):
    """An acceptance rule that scores candidates by where they fall in the text: the verifying stage
    keeps one :class:`SourceContext` per session for it and passes each chain round's lexicon."""

    def source_context(self) -> SourceContext | None: ...

    def round_lexicon(self, source: SourceContext, rollback: int, context: Sequence[int],
                      candidates: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...
