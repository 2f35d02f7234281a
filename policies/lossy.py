"""Lossy acceptance rules, each opt-in under its own name: ``typical``, ``fly`` and ``importance``.

Every rule only says how many drafted tokens to keep (:class:`~.acceptance.ChainInputs` in, a count
out); the shared verifier draws the uniforms, and samples the correction at the first position not
kept from ``norm(max(p - q, 0))`` (the argmax at temperature 0) or the bonus. Each rule keeps
everything ``exact`` keeps, so a kept prefix only grows; the output is no longer distributed as p.

- ``typical`` (Medusa): keep ``x_i`` when it passes the exact test or when
  ``p_raw_i(x_i) > min(eps, delta * exp(-H(p_raw_i)))`` (H in nats, as Medusa computes it).
- ``fly`` (FLy, arXiv:2511.22972): see :class:`Fly`.
- ``importance`` (ours, after DSD): see :class:`ImportanceAcceptance`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import code_context as cc
from . import importance as imp
from .acceptance import ACCEPTANCE, ChainInputs, PolicyMap, first_rejection
from .options import read_bool, read_choice, read_float, read_int

IMPORTANT = 0.5  # positions scoring at least this are always verified exactly


@dataclass(frozen=True)
class Typical:
    """Medusa's typical acceptance (defaults ``eps = 0.09``, ``delta = 0.3 = sqrt(eps)``)."""

    eps: float = 0.09
    delta: float = 0.3
    lossless: bool = False
    chain_only: bool = True

    def accepted(self, inp: ChainInputs) -> int:
        g = inp.tokens.numel()
        rows = inp.p_raw[:g].float()  # [g, V]
        entropy = torch.special.entr(rows).sum(dim=-1)  # [g] nats
        threshold = torch.clamp(self.delta * torch.exp(-entropy), max=self.eps)  # [g]
        typical = rows[torch.arange(g), inp.tokens] > threshold  # [g]
        return first_rejection([n or bool(t) for n, t in zip(inp.native, typical)])


def top3_entropy(p_raw: torch.Tensor) -> torch.Tensor:
    """``[g]`` entropy in nats of the renormalised three most likely tokens of each row of ``[g, V]``.

    Nats because vLLM's FLy, whose 0.3 default we keep, computes it with natural logs; the maximum is
    ``ln 3 = 1.0986`` (three equal choices). vLLM does not renormalise the top 3: on a flat target
    (top 3 holding little mass) its value falls towards 0, ours stays high; renormalised, the value
    only says how evenly the target hesitates between its three best tokens.
    """
    top = p_raw.float().topk(min(3, p_raw.shape[-1]), dim=-1).values  # [g, 3]
    top = top / top.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.special.entr(top).sum(dim=-1)


@dataclass(frozen=True)
class Fly:
    """FLy's entropy-gated deferral.

    A position ``i`` that fails the exact test is kept when all of these hold, else the chain stops
    at ``i``:

    - the renormalised top-3 entropy of ``p_raw_i`` is at least ``entropy`` (:func:`top3_entropy`);
    - the draft token is possible: ``p_raw_i(x_i) > 0`` at temperature 0, ``p_i(x_i) > 0`` (the
      user's warped target) and ``q_i(x_i) > 0`` otherwise;
    - a full window fits: with ``W = min(window, g - 1)``, positions ``i + 1 .. i + W`` exist
      (``i + W <= g - 1``) and all pass the exact test.

    End of the chain: a mismatch with fewer than ``W`` drafted positions after it is never deferred
    (as in vLLM: the window must fit in the draft), so the last ``W`` positions are verified
    exactly, and a chain of one token (``W = 0``) is exactly ``exact``. A second mismatch inside a
    window ends the deferral: the chain stops at the first one. After a kept window the scan
    resumes at ``i + W + 1``.
    """

    entropy: float = 0.3
    window: int = 6
    lossless: bool = False
    chain_only: bool = True

    def accepted(self, inp: ChainInputs) -> int:
        g = inp.tokens.numel()
        w = min(self.window, g - 1)
        native = inp.native
        i = 0
        while i < g:
            if native[i]:
                i += 1
                continue
            if w < 1 or i + w > g - 1 or not all(native[i + 1 : i + 1 + w]):
                return i
            x = int(inp.tokens[i])
            if inp.temperature == 0:
                possible = float(inp.p_raw[i, x]) > 0
            else:
                possible = float(inp.p[i, x]) > 0 and float(inp.q_x[i]) > 0
            if not possible or float(top3_entropy(inp.p_raw[i : i + 1])[0]) < self.entropy:
                return i
            i += w + 1
        return g


@dataclass(frozen=True, eq=False)  # holds a tensor: compare rules by identity
class ImportanceAcceptance:
    """Importance-aware acceptance (ours, after DSD's adaptive verification): one knob, ``strength``.

    Each drafted position gets an importance ``s_i`` in [0, 1] (:mod:`.importance`; by default the
    larger of the lexical score and the target's own confidence / the draft's over-confidence).
    Positions with ``s_i >= 0.5`` are always verified exactly. Elsewhere a mismatch is kept when the
    draft token is one of the target's own near-best choices:

        ref_i(x_i) >= (1 - rho_i) * max ref_i,   rho_i = strength * (1 - s_i / 0.5) > 0,

    ``ref`` being ``p_raw`` at temperature 0 and the user's warped ``p`` otherwise (so a token the
    user's top-k/top-p removed is never kept). Why this beats importance-free relaxations at equal
    quality: a kept token costs the target at most ``-ln(1 - rho_i)`` nats against its best choice,
    so every deviation is one the target itself nearly made (typical acceptance keeps ``p > 0.09``
    even beside a 0.9 argmax); ``rho`` shrinks continuously with importance, so confident positions
    (a 0.8 margin scores 0.76) and the tokens that break code (names, numbers, operators) are left
    exact, and the knob is spent where mismatches are frequent and harmless (whitespace, punctuation,
    function words at positions where the target hesitates); at temperature > 0 the over-confidence
    term caps what a kept token can gain: ``q(x) <= 2 p(x)``, so no token's output probability more
    than doubles. Strength 0 keeps exactly what ``exact`` keeps; more strength never keeps fewer.

    Following the text (``texts``), a comment or docstring is prose (importance 0) except its
    opening word (``lead``, :data:`~.code_context.LEAD`), verified exactly: a code model's comment is
    the plan of the code under it, and the 0.5B draft's plans part from the target's on that word
    (``# Your`` for the target's ``# Sort``, then ``code here`` and ``pass``), while the words after
    it follow the plan it set.
    """

    strength: float
    scorer: str = "combined"
    table: torch.Tensor | None = None  # [V] lexical importance by token id, or None
    texts: Sequence[str] | None = None  # text of every token id, to follow the source; or None
    lead: bool = True  # the opening word of a comment or docstring is verified exactly
    lossless: bool = False
    chain_only: bool = True

    def lexical(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """``[g]`` lexical importance of ``tokens`` (``[g]`` int64), or None without a vocabulary."""
        return None if self.table is None else self.table[tokens]

    def source_context(self) -> cc.SourceContext | None:
        """A new session's scanner of the text (None when the rule does not follow the source:
        scorer ``distributional``, no vocabulary, or ``importance_context = false``)."""
        if self.texts is None or self.table is None or self.scorer == "distributional":
            return None
        return cc.SourceContext(self.texts)

    def round_lexicon(self, source: cc.SourceContext, rollback: int, context: Sequence[int],
                      candidates: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``([g]`` lexical importance, ``[g]`` bool prose``)`` of a chain round's candidates
        (``[g]`` int64) in the session's text: prose tokens score :data:`~.importance.PROSE`, tokens
        that open or close a comment or docstring 1 (structure), and so does the span's opening word
        (:data:`~.code_context.LEAD`) unless ``lead`` is off; code tokens their per-token score.
        ``(None, None)`` when ``source`` lost track of the text (the per-token lexicon then)."""
        kinds = source.kinds(rollback, context, candidates)  # [g]
        if kinds is None:
            return None, None
        lexical = self.table[candidates].clone()  # [g]
        prose = (kinds == cc.PROSE) | (kinds == cc.LEAD)  # [g]
        lexical[prose] = imp.PROSE
        lexical[kinds == cc.BOUNDARY] = imp.WORD
        if self.lead:
            lexical[kinds == cc.LEAD] = imp.WORD
        return lexical, prose

    def importance(self, inp: ChainInputs) -> torch.Tensor:
        """``[g]`` the importance of every drafted position."""
        lexical = inp.importance if inp.importance is not None else self.lexical(inp.tokens)
        return imp.score(self.scorer, inp, lexical)

    def accepted(self, inp: ChainInputs) -> int:
        exact = first_rejection(inp.native)
        if self.strength == 0 or exact == len(inp.native):
            return exact
        s = self.importance(inp)  # [g]
        rho = (self.strength * (1.0 - s / IMPORTANT)).tolist()  # [g]; <= 0 where important
        g = len(inp.native)
        for i in range(exact, g):
            if inp.native[i]:
                continue
            if rho[i] <= 0:
                return i
            ref = inp.p_raw[i] if inp.temperature == 0 else inp.p[i]  # [V]
            px = float(ref[inp.tokens[i]])
            if not (px > 0 and px >= (1.0 - rho[i]) * float(ref.max())):
                return i
        return g


@ACCEPTANCE.register("typical")
def _typical(options: PolicyMap, vocab: Sequence[str] | None) -> Typical:
    return Typical(
        eps=read_float(options, "typical_eps", 0.09, 0.0, 1.0, lo_open=True),
        delta=read_float(options, "typical_delta", 0.3, 0.0, math.inf),
    )


@ACCEPTANCE.register("fly")
def _fly(options: PolicyMap, vocab: Sequence[str] | None) -> Fly:
    return Fly(
        entropy=read_float(options, "fly_entropy", 0.3, 0.0, math.log(3)),  # nats: ln 3 is the top
        window=read_int(options, "fly_window", 6, 1, 256),
    )


# Chosen by the quality bench's rule (fastest within one HumanEval problem of exact) on the bundled
# pair at T = 0.7, gamma 8, two samples per problem of HumanEval 0-19, the opening word of a comment
# exact: 1.0 passed 30/40 against exact's 31/40 at 1.08x its tokens/s, 0.75 31/40 at 1.03x; without
# the opening word, 1.0 fell to 27/40 (README, "Acceptance policies at temperature 0.7").
DEFAULT_STRENGTH = 1.0


@ACCEPTANCE.register("importance")
def _importance(options: PolicyMap, vocab: Sequence[str] | None) -> ImportanceAcceptance:
    scorer = read_choice(options, "importance_scorer", "combined", imp.SCORERS)
    if scorer == "lexical" and vocab is None:
        raise ValueError("importance_scorer = 'lexical' needs the vocabulary's token strings (none given)")
    return ImportanceAcceptance(
        strength=read_float(options, "importance_strength", DEFAULT_STRENGTH, 0.0, 1.0),
        scorer=scorer,
        table=None if vocab is None else imp.lexical_table(vocab),
        texts=cc.token_texts(vocab) if vocab is not None and read_bool(options, "importance_context", True)
        else None,
        lead=read_bool(options, "importance_lead", True),
    )
