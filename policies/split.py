"""Split verification (DSSD): the edge runs the accept tests, the device draws the correction.

Where verification runs is a session policy (``verification`` in the policy map):

- ``target``: the last stage verifies against the sparse q rows the proposal carried (the default).
- ``split``: the uplink carries only the drafted ids and their scalar draft probabilities
  ``q_i(x_i)``. The last stage accepts ``x_i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``;
  after full acceptance it draws the bonus from ``p_g`` itself; at the first rejection ``j`` it sends
  down ``p_j`` instead of a token, and the device, which kept ``q_j``, draws the correction from
  ``norm(max(p_j - q_j, 0))``.

Why it stays exact. The edge does not know ``q_j``, so it cannot tell where ``p_j > q_j``; it sends
every token where ``p_j > 0`` (the support after the user's warpers: one entry at temperature 0, k
under top-k, the whole vocabulary under plain temperature), in float32, the very values its ratio
test used. The residual is then computed from exactly the p and q that target-side verification
would use. The device replays the verifier's generator (keyed by the round's base position, advanced
past the ``g`` acceptance uniforms), so a seeded split run commits the very tokens a target-side run
commits. Chains only: a tree's recursive rejection needs every rejected sibling's full q row at the
edge, which the split uplink does not carry.

Pure tensor math, no model, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from specmesh.runtime import sampling
from specmesh.runtime.messages import SamplingParams
from specmesh.runtime.sparse import SparseDist
from specmesh.runtime.verify import exact_tests, residual

from .acceptance import AcceptanceRule, chain_accepted

TARGET = "target"
SPLIT = "split"
VERIFICATIONS = (TARGET, SPLIT)


def verification_mode(policy: Mapping[str, object]) -> str:
    """The session's verification placement from its policy map (default ``target``).

    Raises:
        ValueError: naming the bad value and the accepted ones.
    """
    mode = policy.get("verification", TARGET)
    if mode not in VERIFICATIONS:
        raise ValueError(f"verification must be one of {VERIFICATIONS}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class SplitVerdict:
    """The edge's half of a split round.

    Attributes:
        accepted: drafted tokens kept.
        tokens: the accepted tokens, plus the bonus when every drafted token was accepted.
        accepted_mask: per drafted position, whether it was accepted.
        correction_p: None after full acceptance; else the one-row support of ``p_j`` (float32,
            every token with ``p_j > 0``) from which the device draws the correction.
    """

    accepted: int
    tokens: list[int]
    accepted_mask: list[bool] = field(default_factory=list)
    correction_p: SparseDist | None = None


def target_support(target_row: torch.Tensor) -> SparseDist:
    """Every token of ``target_row`` ``[V]`` with positive probability, float32 values unchanged:
    all that ``norm(max(p - q, 0))`` can ever need, whatever q was."""
    ids = (target_row > 0).nonzero().view(1, -1)  # [1, n] ascending ids
    return SparseDist(ids, target_row.float()[ids], int(target_row.numel()))


def verify_split(rule: AcceptanceRule, draft_tokens: torch.Tensor, draft_probs: torch.Tensor,
                 logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                 warp: Callable[[torch.Tensor], torch.Tensor],
                 importance: torch.Tensor | None = None,
                 prose: torch.Tensor | None = None) -> SplitVerdict:
    """The last stage's half of a split round: accept tests, then the bonus or ``p_j``.

    Args:
        rule: the session's acceptance rule (chains; lossy rules see the same inputs as target-side).
        draft_tokens: ``[g]`` int64, the drafted chain.
        draft_probs: ``[g]`` float32, ``q_i(x_i)`` as the draft sampled them.
        logits: ``[g + 1, V]`` raw target logits (row 0 after the last context token).
        params: the session's sampling parameters.
        generator: ``generator_for(seed, STREAM_VERIFY, base)``.
        warp: logits -> the user's warped probabilities ``[g + 1, V]``.
        importance: ``[g]`` lexical importance (rules with a lexicon).
        prose: ``[g]`` bool, candidates inside a comment or docstring (rules that follow the text).
    """
    p = warp(logits)  # [g + 1, V]
    g = draft_tokens.numel()
    if p.shape[0] != g + 1 or draft_probs.shape != (g,):
        raise ValueError(f"shape mismatch: {g} draft tokens, q_x {tuple(draft_probs.shape)}, "
                         f"{p.shape[0]} p rows (want g + 1)")
    native = exact_tests(draft_tokens, draft_probs, p, generator, params.temperature)
    accepted = chain_accepted(rule, draft_tokens, draft_probs, p, logits, native, params.temperature, importance,
                              prose)
    kept = draft_tokens[:accepted].tolist()
    mask = [i < accepted for i in range(g)]
    if accepted < g:
        return SplitVerdict(accepted, kept, mask, target_support(p[accepted]))
    if params.temperature == 0:
        bonus = int(p[g].argmax())
    else:
        bonus = int(sampling.sample(p[g : g + 1].float(), generator)[0])
    return SplitVerdict(accepted, kept + [bonus], mask)


def correction_generator(seed: int, base: int, num_candidates: int, temperature: float) -> torch.Generator:
    """The device's generator for the correction of the round at ``base``: the verifier's own
    (``STREAM_VERIFY`` at ``base``) past the ``num_candidates`` uniforms the edge drew, so the draw is
    the one target-side verification would make and never reuses an acceptance uniform."""
    gen = sampling.generator_for(seed, sampling.STREAM_VERIFY, base)
    if temperature > 0:
        sampling.uniform(num_candidates, gen)
    return gen


def draw_correction(correction_p: SparseDist, draft_row: SparseDist, generator: torch.Generator,
                    temperature: float) -> int:
    """The device's half: the correction token from ``norm(max(p_j - q_j, 0))``.

    Args:
        correction_p: one row, the support of ``p_j`` the edge sent.
        draft_row: one row, the (normalised) q the draft sampled ``x_j`` from.
        generator: from :func:`correction_generator`.
        temperature: 0 takes the argmax of ``p_j`` (as target-side greedy verification does).
    """
    if correction_p.num_positions != 1 or draft_row.num_positions != 1:
        raise ValueError(f"one row each, got p {correction_p.num_positions} and q {draft_row.num_positions}")
    if correction_p.vocab_size != draft_row.vocab_size:
        raise ValueError(f"vocabularies differ: p {correction_p.vocab_size}, q {draft_row.vocab_size}")
    p = correction_p.to_dense()  # [1, V]
    if temperature == 0:
        return int(p[0].argmax())
    return int(sampling.sample(residual(p, draft_row.to_dense()), generator)[0])
