"""Verification of a chain of draft tokens against the target: greedy and exact speculative sampling.

Pure functions over tensors (Leviathan et al. 2023; Chen et al. 2023). ``p`` = target, ``q`` = draft.
The draft's q is the *sparse* distribution it really sampled from (TSLT: sparsify, then sample); every
token it does not list has q = 0, which keeps exact verification lossless whatever the truncation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import sample, uniform
from .sparse import SparseDist, normalised


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one round.

    Attributes:
        accepted: number of draft tokens accepted (0..gamma).
        tokens: the tokens to commit: the accepted draft tokens, then one correction (after a
            rejection) or bonus (after full acceptance) token; ``accepted + 1`` tokens.
        accepted_mask: per drafted position, whether it was accepted (positions after the first
            rejection are False: they were never tested).
    """

    accepted: int
    tokens: list[int]
    accepted_mask: list[bool] = field(default_factory=list)

    @property
    def next_token(self) -> int:
        """The correction or bonus token (the last committed token)."""
        return self.tokens[-1]


def residual(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """``norm(max(p - q, 0))`` per row; falls back to ``p`` where ``p == q`` leaves no residual mass.

    Args:
        target_probs: ``[n, V]``.
        draft_probs: ``[n, V]`` (dense view of the sparse q).
    Returns:
        ``[n, V]`` float32, rows summing to 1.
    """
    diff = (target_probs.float() - draft_probs.float()).clamp_min(0.0)
    total = diff.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, diff / total.clamp_min(1e-30), target_probs.float())


def chain_tests(
    draft_tokens: torch.Tensor, draft_q: SparseDist, target_probs: torch.Tensor,
    generator: torch.Generator, temperature: float,
) -> tuple[list[bool], torch.Tensor]:
    """The exact test at every drafted position of a chain, with one shared set of draws.

    At temperature 0 ``x_i`` passes when it is the argmax of ``p_i`` (no draws); otherwise when
    ``u_i * q_i(x_i) < p_i(x_i)`` with ``u ~ U[0, 1)^gamma`` drawn once (``u < p/q`` without a
    division; ``q_i(x_i) > 0`` for a token the draft really sampled).

    Args:
        draft_tokens: ``[gamma]`` int64.
        draft_q: ``gamma`` rows (already normalised), the distributions the tokens were drawn from.
        target_probs: ``[gamma + 1, V]`` (at temperature 0 only the argmax matters).
        generator: the verifier's randomness.
        temperature: the session's temperature.
    Returns:
        ``native`` (``gamma`` bools, every position tested) and ``q_x`` ``[gamma]`` float32.
    """
    gamma = draft_tokens.numel()
    if target_probs.shape[0] != gamma + 1 or (temperature > 0 and draft_q.num_positions != gamma):
        raise ValueError(
            f"shape mismatch: {gamma} draft tokens, {draft_q.num_positions} q rows, "
            f"{target_probs.shape[0]} p rows (want gamma + 1)"
        )
    q_x = draft_q.prob_of(draft_tokens) if draft_q.num_positions else torch.ones(gamma)  # [gamma]
    return exact_tests(draft_tokens, q_x, target_probs, generator, temperature), q_x


def exact_tests(draft_tokens: torch.Tensor, q_x: torch.Tensor, target_probs: torch.Tensor,
                generator: torch.Generator | None, temperature: float) -> list[bool]:
    """The exact test per drafted position given ``q_x`` ``[gamma]``, each token's draft probability
    (what :func:`chain_tests` reads from the rows; what split verification's uplink carries): the
    argmax test at temperature 0 (no draws), else ``u_i * q_x[i] < p_i(x_i)`` with one ``u ~ U[0,
    1)^gamma`` from ``generator``."""
    gamma = draft_tokens.numel()
    if temperature == 0:
        argmax = target_probs[:gamma].argmax(dim=-1)  # [gamma]
        return (argmax == draft_tokens).tolist()
    p_x = target_probs[torch.arange(gamma), draft_tokens].float()  # [gamma]
    u = uniform(gamma, generator)  # [gamma]
    return (u * q_x.float() < p_x).tolist()


def finish_chain(
    accepted: int, draft_tokens: torch.Tensor, draft_q: SparseDist, target_probs: torch.Tensor,
    generator: torch.Generator, temperature: float,
) -> Verdict:
    """Commits ``accepted`` drafted tokens plus one correction (after a rejection) or bonus token.

    The correction at position ``j = accepted < gamma`` is drawn from ``norm(max(p_j - q_j, 0))``
    (the argmax of ``p_j`` at temperature 0); after full acceptance the bonus from ``p_gamma``.
    """
    gamma = draft_tokens.numel()
    if temperature == 0:
        last = int(target_probs[accepted].argmax())
    else:
        if accepted < gamma:
            q_dense = draft_q.row(accepted).to_dense()  # [1, V]
            dist = residual(target_probs[accepted : accepted + 1], q_dense)
        else:
            dist = target_probs[gamma : gamma + 1].float()
        last = int(sample(dist, generator)[0])
    tokens = draft_tokens[:accepted].tolist() + [last]
    return Verdict(accepted, tokens, [i < accepted for i in range(gamma)])


def verify_greedy(draft_tokens: torch.Tensor, target_probs: torch.Tensor) -> Verdict:
    """Temperature 0: accept while the draft token is the target's argmax.

    Args:
        draft_tokens: ``[gamma]`` int64.
        target_probs: ``[gamma + 1, V]`` (or logits: only the argmax matters).
    """
    empty = SparseDist.empty(target_probs.shape[1])
    native, _ = chain_tests(draft_tokens, empty, target_probs, None, 0.0)
    accepted = native.index(False) if False in native else len(native)
    return finish_chain(accepted, draft_tokens, empty, target_probs, None, 0.0)


def verify_exact(
    draft_tokens: torch.Tensor,
    draft_q: SparseDist,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> Verdict:
    """Exact speculative sampling: the committed tokens are distributed exactly as p.

    Accept ``x_i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection sample a
    correction from ``norm(max(p_i - q_i, 0))``; if all are accepted sample a bonus from ``p_gamma``.
    Rows of ``draft_q`` that crossed the wire sum to 1 up to rounding: they are renormalised first.

    Args:
        draft_tokens: ``[gamma]`` int64, ``x_i ~ q_i``.
        draft_q: ``gamma`` rows, the sparse distributions the tokens were drawn from.
        target_probs: ``[gamma + 1, V]`` float, p for each drafted position and the bonus position.
        generator: source of the acceptance uniforms and the correction/bonus draw.
    """
    gamma = draft_tokens.numel()
    if draft_q.num_positions != gamma:
        raise ValueError(f"shape mismatch: {gamma} draft tokens, {draft_q.num_positions} q rows")
    draft_q = normalised(draft_q) if gamma else draft_q
    native, _ = chain_tests(draft_tokens, draft_q, target_probs, generator, 1.0)
    accepted = native.index(False) if False in native else gamma
    return finish_chain(accepted, draft_tokens, draft_q, target_probs, generator, 1.0)
