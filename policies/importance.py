"""Importance of a drafted token: how much its exact identity matters (DSD's adaptive verification).

Scores are in [0, 1]: 1 = verify exactly, 0 = the target would not mind another plausible token.

- **lexical**: from the token's string alone, precomputed once per vocabulary into a ``[V]`` table so
  that scoring a token is one gather. Identifiers, keywords, numbers, operators and special tokens
  are important (1); whitespace, newlines with their indentation, punctuation and English function
  words are not (0.0-0.1); what cannot be read (partial UTF-8 bytes) sits in between (0.5).
- **distributional**, from the target at the position: its *confidence*
  ``(top-2 margin + exp(-entropy)) / 2`` of ``p_raw`` (1 for a one-hot, 0.25 for a two-way tie,
  about ``1/(2k)`` for ``k`` equal choices), and at temperature > 0 the draft's *over-confidence*
  ``1 - min(1, p(x) / q(x))`` (how much more mass the draft put on ``x`` than the target).
- **combined** (default): the larger of the two, so a position is relaxed only where the lexicon
  and the target's own distribution both say its identity matters little.
"""
from __future__ import annotations

import string
import unicodedata
from functools import lru_cache
from typing import Sequence

import torch

from .acceptance import ChainInputs

SCORERS = ("combined", "lexical", "distributional")

SPACE, NEWLINE, PUNCT, FUNCTION_WORD, OTHER, WORD, NUMBER, OPERATOR, SPECIAL = (
    0.0, 0.1, 0.1, 0.1, 0.5, 1.0, 1.0, 1.0, 1.0
)
PROSE = 0.0  # a token inside a comment or docstring (policies/code_context.py)
_OPERATORS = set("+-*/%=<>&|^~@")
_PUNCT = set(string.punctuation) - _OPERATORS
# English function words, minus Python keywords (``and``, ``in``, ``is``, ``not``, ``if``, ``for``,
# ``with``, ``from``, ``as``, ``or``, ``while`` ... change a program's meaning) and single letters
# (loop variables and parameters in code).
FUNCTION_WORDS = frozenset("""
the an of to that this these those it its be been being are was were am on at by into onto about
over under then than so such there here which who whom whose what when where why how also very
just can could would should will shall may might must do does did has have had we you he she they
me us him her them my our your his their but nor yet all any some each every both either neither
only own same too up down out off again further once because until ll re ve
""".split())
_CACHE_ENTRIES = 4
_tables: dict[int, tuple[Sequence[str], torch.Tensor]] = {}


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable stand-in character of every byte -> the byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_text(token: str) -> str:
    """The text a vocabulary entry stands for: byte-level BPE (``Ġ`` = space, ``Ċ`` = newline) and
    SentencePiece (``▁`` = space) spellings are decoded; other strings are returned as they are."""
    dec = _byte_decoder()
    if any(0x100 <= ord(c) <= 0x143 for c in token) and all(c in dec for c in token):
        return bytes(dec[c] for c in token).decode("utf-8", errors="replace")
    return token.replace("\u2581", " ")


def is_special(text: str) -> bool:
    """Whether a token's text is a control token's spelling (``<|endoftext|>``, ``<s>``, ``</s>``)."""
    core = text.strip()
    tag = core.startswith("<") and core.endswith(">") and core[1:-1].strip("/|").isidentifier()
    return tag or (core.startswith("<|") and core.endswith("|>"))


def lexical_score(token: str) -> float:
    """Importance of one vocabulary entry from its string (see the module docstring)."""
    text = token_text(token)
    core = text.strip()
    if not core:
        return NEWLINE if "\n" in text else (SPACE if text else OTHER)
    if is_special(core):
        return SPECIAL  # <|endoftext|>, <s>, </s>: ending or restructuring the output matters
    score, word = 0.0, []
    for c in core + " ":
        if c.isalpha() or c == "_" or (c.isdigit() and word):
            word.append(c)
            continue
        if word:
            w = "".join(word)
            score = max(score, FUNCTION_WORD if w.lower() in FUNCTION_WORDS else WORD)
            word = []
        if c.isdigit():
            score = max(score, NUMBER)
        elif c in _OPERATORS:
            score = max(score, OPERATOR)
        elif c.isspace():
            score = max(score, SPACE)
        elif c in _PUNCT or (c != "\ufffd" and unicodedata.category(c).startswith("P")):
            score = max(score, PUNCT)
        else:
            score = max(score, OTHER)  # U+FFFD (a partial UTF-8 sequence), symbols, emoji
    return score


def lexical_table(vocab: Sequence[str]) -> torch.Tensor:
    """``[V]`` float32 lexical importance of every vocabulary entry, built once per vocabulary object.

    Cached by the vocabulary's identity (the cache keeps a reference, so an id is never reused while
    its table is cached); a few vocabularies are kept.
    """
    hit = _tables.get(id(vocab))
    if hit is not None and hit[0] is vocab:
        return hit[1]
    table = torch.tensor([lexical_score(t) for t in vocab], dtype=torch.float32)  # [V]
    if len(_tables) >= _CACHE_ENTRIES:
        _tables.pop(next(iter(_tables)))
    _tables[id(vocab)] = (vocab, table)
    return table


def target_confidence(p_raw: torch.Tensor) -> torch.Tensor:
    """``(top-2 margin + exp(-H)) / 2`` per row (H in nats).

    Args:
        p_raw: ``[g, V]`` target probabilities.
    Returns:
        ``[g]`` float32 in (0, 1].
    """
    top2 = p_raw.topk(min(2, p_raw.shape[-1]), dim=-1).values  # [g, 2]
    margin = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0.0)  # [g]
    entropy = torch.special.entr(p_raw.float()).sum(dim=-1)  # [g]
    return 0.5 * (margin + torch.exp(-entropy))


def over_confidence(inp: ChainInputs) -> torch.Tensor:
    """``[g]`` ``1 - min(1, p_i(x_i) / q_i(x_i))`` at temperature > 0; zeros at temperature 0 (greedy
    drafting: ``q_x`` is then no sampling probability)."""
    g = inp.tokens.numel()
    if inp.temperature == 0:
        return torch.zeros(g)
    p_x = inp.p[torch.arange(g), inp.tokens].float()  # [g]
    return 1.0 - torch.clamp(p_x / inp.q_x.float().clamp_min(1e-30), max=1.0)


def distributional(inp: ChainInputs) -> torch.Tensor:
    """``[g]`` the larger of the target's confidence and the draft's over-confidence."""
    g = inp.tokens.numel()
    return torch.maximum(target_confidence(inp.p_raw[:g]), over_confidence(inp))


def score(scorer: str, inp: ChainInputs, lexical: torch.Tensor | None) -> torch.Tensor:
    """``[g]`` importance of every drafted position under ``scorer``.

    ``combined`` takes the lexicon alone at prose positions (``inp.prose``: inside a comment or a
    docstring, where the token's identity cannot change what the program does, however confident
    the target is) and the larger of the two scores elsewhere.

    Args:
        scorer: one of :data:`SCORERS`.
        inp: the chain.
        lexical: ``[g]`` lexical importance of ``inp.tokens`` (None without a vocabulary; then
            ``lexical`` raises and ``combined`` is ``distributional``).
    """
    if scorer == "distributional" or (scorer == "combined" and lexical is None):
        return distributional(inp)
    if lexical is None:
        raise ValueError("importance_scorer = 'lexical' needs the vocabulary's token strings")
    if scorer == "lexical":
        return lexical.float()
    if scorer == "combined":
        both = torch.maximum(lexical.float(), distributional(inp))  # [g]
        return both if inp.prose is None else torch.where(inp.prose, lexical.float(), both)
    raise ValueError(f"importance_scorer = {scorer!r}: must be one of {list(SCORERS)}")
