"""Acceptance policies: how the verifier decides which draft tokens to keep.

Policies decide, the verifier executes. Every rule sees the same inputs, drawn the same way
(:class:`ChainInputs`: the exact test's outcome per position, from one shared set of uniforms), and
only says how many drafted tokens to keep; the greedy/sampled dispatch, the correction from the
residual and the bonus draw are shared (:func:`verify_round`). So a relaxed rule at strength 0 is
``exact`` draw for draw, and a new rule cannot get the lossless part wrong.

``exact`` is lossless: greedy verification at temperature 0, exact speculative sampling otherwise,
for chains and trees. Lossy rules (typical acceptance, FLy, importance-aware acceptance) register
under their own names (``policies/lossy.py``); they never hide behind a flag on the exact one, and
they verify chains only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import torch

from specmesh.runtime.messages import SamplingParams
from specmesh.runtime.sparse import SparseDist, normalised
from specmesh.runtime.tree import TokenTree, verify_tree_exact, verify_tree_greedy
from specmesh.runtime.verify import Verdict, chain_tests, finish_chain

from .registry import Registry

PolicyValue = str | int | float | bool
PolicyMap = Mapping[str, PolicyValue]


@dataclass(frozen=True)
class ChainInputs:
    """What a rule may look at for one drafted chain (``g`` positions).

    Attributes:
        tokens: ``[g]`` int64, the drafted chain.
        q_x: ``[g]`` float32, probability of ``tokens[i]`` under the sparse q it was drawn from.
        p: ``[g + 1, V]`` float32 target probabilities after the user's warpers (one-hot on the
            argmax at temperature 0).
        p_raw: ``[g + 1, V]`` float32 softmax of the raw target logits (temperature 1, no warpers).
        native: ``[g]`` the exact test per position: at temperature > 0 ``u_i * q_x[i] < p[i, x_i]``,
            at temperature 0 ``x_i == argmax p[i]``.
        temperature: the session's temperature.
        importance: ``[g]`` lexical importance of ``tokens[i]`` in [0, 1], or None when the rule has
            no lexicon.
        prose: ``[g]`` bool, True where the token lies inside a comment or docstring of the text
            (:mod:`.code_context`), or None when the verifier does not follow the text.
    """

    tokens: torch.Tensor  # [g] int64
    q_x: torch.Tensor  # [g] float32
    p: torch.Tensor  # [g + 1, V] float32
    p_raw: torch.Tensor  # [g + 1, V] float32
    native: list[bool]
    temperature: float
    importance: torch.Tensor | None = None  # [g]
    prose: torch.Tensor | None = None  # [g] bool


class AcceptanceRule(Protocol):
    """A rule: ``accepted(inputs)`` -> how many drafted tokens to keep (0..g)."""

    lossless: bool
    chain_only: bool

    def accepted(self, inp: ChainInputs) -> int: ...


# factory(policy map, vocabulary token strings by id or None) -> rule
RuleFactory = Callable[[PolicyMap, Sequence[str] | None], AcceptanceRule]
ACCEPTANCE: Registry[RuleFactory] = Registry("acceptance policy")


def first_rejection(native: Sequence[bool]) -> int:
    """Index of the first False (``len(native)`` when every position passes)."""
    return next((i for i, ok in enumerate(native) if not ok), len(native))


@dataclass(frozen=True)
class Exact:
    """Lossless: keep the drafted tokens up to the first that fails the exact test."""

    lossless: bool = True
    chain_only: bool = False

    def accepted(self, inp: ChainInputs) -> int:
        return first_rejection(inp.native)


ACCEPTANCE.register("exact")(lambda options, vocab: Exact())


def verify_round(
    rule: AcceptanceRule,
    tree: TokenTree,
    draft_q: SparseDist,
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    warp: Callable[[torch.Tensor], torch.Tensor],
    importance: torch.Tensor | None = None,
    prose: torch.Tensor | None = None,
) -> Verdict:
    """Verifies one round's candidates: the one verifier every acceptance rule runs through.

    Args:
        rule: the session's acceptance rule.
        tree: the candidates (a chain or a tree of ``g``).
        draft_q: ``g`` rows, row ``i`` the distribution candidate ``i`` was drawn from (rows that
            crossed the wire are renormalised here, for chains and trees alike).
        logits: ``[g + 1, V]`` raw target logits; row 0 follows the last context token, row ``1 + i``
            follows candidate ``i``.
        params: the session's sampling parameters (temperature decides greedy or sampled).
        generator: the verifier's randomness for this round.
        warp: logits -> the user's warped target probabilities ``[g + 1, V]``.
        importance: ``[g]`` lexical importance of the candidates (rules with a lexicon).
        prose: ``[g]`` bool, candidates inside a comment or docstring (rules that follow the text).
    Returns:
        a Verdict (a TreeVerdict with ``path`` for trees).
    """
    p = warp(logits)  # [g + 1, V]
    if not tree.is_chain:
        if rule.chain_only:
            raise ValueError(
                f"acceptance policy {type(rule).__name__} verifies chains only: use tree_width=1"
            )
        if params.temperature == 0:
            return verify_tree_greedy(tree, p)
        return verify_tree_exact(tree, draft_q, p, generator)  # renormalises q itself
    q = normalised(draft_q) if draft_q.num_positions else draft_q
    native, q_x = chain_tests(tree.tokens, q, p, generator, params.temperature)
    accepted = chain_accepted(rule, tree.tokens, q_x, p, logits, native, params.temperature, importance,
                              prose)
    return finish_chain(accepted, tree.tokens, q, p, generator, params.temperature)


def chain_accepted(rule: AcceptanceRule, tokens: torch.Tensor, q_x: torch.Tensor, p: torch.Tensor,
                   logits: torch.Tensor, native: list[bool], temperature: float,
                   importance: torch.Tensor | None = None, prose: torch.Tensor | None = None) -> int:
    """How many of a chain's ``g`` drafted ``tokens`` the rule keeps, given the exact tests'
    outcomes ``native``, ``q_x`` ``[g]``, the warped ``p`` and the raw ``logits`` ``[g + 1, V]``
    (``exact`` needs neither the raw softmax nor the inputs: the first rejection)."""
    if isinstance(rule, Exact):
        return first_rejection(native)
    p_raw = torch.softmax(logits.float(), dim=-1)  # [g + 1, V]
    inp = ChainInputs(tokens, q_x.float(), p, p_raw, native, temperature, importance, prose)
    accepted = int(rule.accepted(inp))
    if not 0 <= accepted <= tokens.numel():
        raise ValueError(f"{type(rule).__name__} kept {accepted} of {tokens.numel()} tokens")
    return accepted
