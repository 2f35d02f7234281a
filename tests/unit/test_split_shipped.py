"""The shipped draft worker and stage in split verification, statistically and draw for draw.

Drives the real ``DraftWorker.propose`` / ``resolve`` and ``TargetStage.step`` through the wire codec
(the proposal up, the verdict down, as every backend does) with a noisy tiny fp32 draft, and checks
(as test_shipped_sampler does for target-side verification) that the committed tokens follow the
target: chi-square of the first token, Kolmogorov-Smirnov of the randomised probability integral
transform of every token given its prefix. And, stronger: with the same seed a split round commits
exactly the tokens a target-side round commits (the device replays the verifier's generator).
"""
from __future__ import annotations

import pytest
import torch
from shipped_stats import follows, target_p

from specmesh.policies import split
from specmesh.runtime import codec
from specmesh.runtime.messages import OpenSession, ProposeRequest, SamplingParams

torch.set_num_threads(1)
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7]
ROUNDS = 1200
SIGNIFICANCE = 1e-3
TEMPERATURE = 1.0
GAMMA = 3
DENSE = {"sparsifier": "dense", "acceptance": "exact"}
TOP8 = {"sparsifier": "top-k", "sparse_k": 8, "acceptance": "exact"}


def one_round(workers, policy: dict, seed: int, temperature: float = TEMPERATURE, top_k: int = 0):
    """One round of a fresh session; returns (committed tokens, uplink bytes, downlink bytes, pending)."""
    draft, stage = workers
    sid = f"s{seed}"
    opened = OpenSession(sid, SamplingParams(temperature=temperature, top_k=top_k, seed=seed), policy)
    draft.open(opened)
    stage.open(opened)
    try:
        up = codec.encode(draft.propose(ProposeRequest(sid, 1, 0, PROMPT, GAMMA, 0, 1, [])))
        down = codec.encode(stage.step(codec.decode(up, vocab_size=draft.vocab_size)))
        verdict = codec.decode(down, vocab_size=draft.vocab_size)
        tokens = list(verdict.tokens) + ([draft.resolve(verdict)] if verdict.pending else [])
        return tokens, len(up), len(down), verdict.pending
    finally:
        draft.close(sid)
        stage.close(sid)


def _pvalues(workers, policy: dict) -> tuple[float, float, float]:
    _, stage = workers
    memo: dict = {}
    rounds, pending = [], 0
    for seed in range(ROUNDS):
        tokens, _, _, was_pending = one_round(workers, policy, seed)
        pending += was_pending
        rounds.append(tokens)
    first_p, pit_p = follows(rounds, lambda prefix: target_p(stage, prefix, memo, TEMPERATURE), PROMPT)
    return first_p, pit_p, pending / ROUNDS


@pytest.mark.parametrize("policy", [DENSE, TOP8], ids=["dense", "top8"])
def test_split_rounds_follow_the_target(workers, policy):
    first, pit, pending = _pvalues(workers, {**policy, "verification": "split"})
    assert first > SIGNIFICANCE and pit > SIGNIFICANCE, (first, pit)
    assert pending > 0.3, f"the device drew the correction in only {pending:.0%} of rounds: no power"


def test_a_device_residual_without_q_is_caught(workers, monkeypatch):
    """Power on the shipped path: the device drawing its correction from p_j alone is biased."""
    monkeypatch.setattr(split, "residual", lambda target_probs, draft_probs: target_probs.float())
    first, pit, _ = _pvalues(workers, {**DENSE, "verification": "split"})
    assert min(first, pit) < SIGNIFICANCE, (first, pit)


@pytest.mark.parametrize("policy,temperature,top_k", [
    (TOP8, 1.0, 0), (DENSE, 0.7, 0), (TOP8, 0.8, 5), (TOP8, 0.0, 0), (DENSE, 0.0, 0),
], ids=["top8", "dense-t0.7", "top8-topk5", "greedy-top8", "greedy-dense"])
def test_split_commits_what_target_side_commits(workers, policy, temperature, top_k):
    """Seed for seed, the same tokens: the verification placement never changes a seeded output."""
    pending = 0
    for seed in range(60):
        want, _, _, _ = one_round(workers, policy, seed, temperature, top_k)
        got, _, _, was_pending = one_round(workers, {**policy, "verification": "split"}, seed, temperature, top_k)
        assert got == want, seed
        pending += was_pending
    assert pending > 5  # the device's half ran


def test_split_bytes(workers):
    """Uplink: 4 bytes of q(x) per candidate instead of q rows; downlink: p_j's support at a rejection
    (1 entry greedy, k under top-k, the whole vocabulary under plain temperature)."""
    sizes = {}
    for name, policy, temperature, top_k in (("top8", TOP8, 1.0, 0), ("dense", DENSE, 1.0, 0),
                                             ("split", {**TOP8, "verification": "split"}, 1.0, 0),
                                             ("split-topk5", {**TOP8, "verification": "split"}, 1.0, 5),
                                             ("split-greedy", {**TOP8, "verification": "split"}, 0.0, 0)):
        rounds = [one_round(workers, policy, seed, temperature, top_k) for seed in range(40)]
        sizes[name] = (max(r[1] for r in rounds), max(r[2] for r in rounds if r[3] or "split" not in name))
    assert sizes["split"][0] < sizes["top8"][0] < sizes["dense"][0]
    # A pending verdict of plain temperature carries the whole 256-token vocabulary (fp32, zstd).
    assert sizes["split"][1] > 256 * 2 > sizes["split-topk5"][1] > sizes["split-greedy"][1]
