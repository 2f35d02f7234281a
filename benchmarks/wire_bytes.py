"""Uplink bytes of one round's DraftProposal under each q encoding (TK-SLT / TSLT vs dense).

Run ``python -m specmesh.benchmarks.wire_bytes [--draft DIR]``. For each scheme it encodes one
``DraftProposal`` per round of ``--gamma`` drafted positions with the real codec and prints bytes per
drafted position and per generated token, with zstd off and on, and the draft probability mass that
the truncation keeps. Candidates are sampled from the quantised q, as a draft worker does.

Draft distributions come from a Hugging Face model directory (``--draft``: softmax of the model's
logits over a text, teacher-forced), else from a synthetic heavy-tailed generator over a vocabulary of
151,936 tokens (a random tiny model gives near-uniform, meaningless distributions at that size). The
output says which source was used. Tokens per round is an input, not a measurement.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from specmesh.runtime import codec, sparse
from specmesh.runtime.messages import DraftProposal, VerifyResult
from specmesh.runtime.sparse import SparseDist

QWEN_VOCAB = 151_936
TOP_KS = (1, 4, 8, 16, 64)
TOP_P_MASSES = (0.9, 0.95, 0.99)
DEFAULT_GAMMA = 4
# Mean tokens committed per round (accepted + bonus); an assumption the user states, e.g. the
# expected length (1 - a**(g+1)) / (1 - a) = 3.36 for acceptance a = 0.8 and gamma 4.
DEFAULT_TOKENS_PER_ROUND = 3.0
DEFAULT_POSITIONS = 256
DEFAULT_SEED = 0
# Synthetic q: per position a Zipf law over ranks, p(rank r) ~ r**-alpha, with alpha drawn uniformly
# (1.2: a flat, high-entropy position; 3.0: a near-certain one). Which token holds which rank is a
# Gumbel-perturbed prior in which low ids are likelier, as frequent tokens have low ids in BPE.
SYNTH_ALPHA_RANGE = (1.2, 3.0)
SYNTH_PRIOR_ID_SCALE = 1000.0  # prior logit is -log(1 + id / scale)
GUMBEL_TINY = 1e-12  # uniform draws are clamped above 0 so that -log(-log(u)) stays finite
# Sequence position of the first measured round (and the verdict's round number): mid-generation, so
# that these integers take the bytes they take in a long session (small integers encode shorter).
BASE_POSITION = 1000
DEFAULT_TEXT = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "Speculative decoding lets a small draft model propose several tokens that a large target model "
    "verifies in one forward pass; when the network, not the arithmetic, is the bottleneck, the size of "
    "each message decides how fast tokens arrive.\n"
)


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    scheme: str
    mean_width: float  # entries sent per position (padding excluded)
    mass_kept: float  # draft mass inside the kept set, mean over positions
    raw: float  # bytes per drafted position, zstd off
    zstd: float  # bytes per drafted position, zstd on


def synthetic_probs(positions: int, vocab: int, seed: int) -> torch.Tensor:
    """Heavy-tailed draft distributions ``[positions, vocab]`` float32 (see ``SYNTH_*``)."""
    gen = torch.Generator().manual_seed(seed)
    prior = -torch.log1p(torch.arange(vocab) / SYNTH_PRIOR_ID_SCALE)  # [V]
    uniform = torch.rand(positions, vocab, generator=gen).clamp_min(GUMBEL_TINY)  # [n, V]
    order = torch.argsort(prior - torch.log(-torch.log(uniform)), dim=-1, descending=True)  # [n, V]
    lo, hi = SYNTH_ALPHA_RANGE
    alpha = lo + (hi - lo) * torch.rand(positions, 1, generator=gen)  # [n, 1]
    by_rank = torch.softmax(-alpha * torch.log1p(torch.arange(vocab).float()), dim=-1)  # [n, V]
    return torch.zeros(positions, vocab).scatter_(1, order, by_rank)


def model_probs(model_dir: str, text: str, positions: int) -> torch.Tensor:
    """Softmax of a real draft's logits over ``text`` (teacher-forced): ``[<=positions, V]`` float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # only this path needs them

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :positions]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # [n, V]
    return torch.softmax(logits.float(), dim=-1)


def measure(probs: torch.Tensor, truncate: Callable[[torch.Tensor], SparseDist], gamma: int,
            level: int, seed: int, index_coding: str) -> tuple[float, float, float, float]:
    """Encodes ``probs`` ``[n, V]`` in rounds of ``gamma`` positions, each truncated by ``truncate``.

    Returns:
        bytes per position without and with zstd, mean entries sent, mean draft mass kept.
    """
    raw_cfg = codec.CodecConfig(compress_threshold=None, index_coding=index_coding)
    zstd_cfg = codec.CodecConfig(compress_threshold=0, compress_level=level, index_coding=index_coding)
    gen = torch.Generator().manual_seed(seed)
    raw_bytes = zstd_bytes = 0
    widths, masses = [], []
    rounds = probs.shape[0] // gamma
    for r in range(rounds):
        block = probs[r * gamma:(r + 1) * gamma]  # [gamma, V]
        q = sparse.quantise_fp16(truncate(block))  # what a draft samples from and sends
        pick = torch.multinomial(q.probs, 1, generator=gen)  # [gamma, 1] positions in each row
        candidates = q.indices.gather(1, pick).view(-1)
        msg = DraftProposal("session-0", r, BASE_POSITION + r * gamma, [int(candidates[-1])], candidates, q)
        raw_bytes += len(codec.encode(msg, raw_cfg))
        zstd_bytes += len(codec.encode(msg, zstd_cfg))
        kept = q.probs > 0
        widths.extend(kept.sum(1).tolist())
        listed = torch.zeros_like(block, dtype=torch.bool).scatter_(1, q.indices, kept)
        masses.extend((block * listed).sum(1).tolist())
    positions = rounds * gamma
    return raw_bytes / positions, zstd_bytes / positions, statistics.fmean(widths), statistics.fmean(masses)


def build_table(probs: torch.Tensor, gamma: int, level: int, seed: int, index_coding: str) -> list[Row]:
    schemes = [("dense fp32", sparse.dense)]
    schemes += [(f"top-K {k}", lambda b, k=k: sparse.top_k(b, k)) for k in TOP_KS]
    schemes += [(f"top-p {m}", lambda b, m=m: sparse.top_p(b, m)) for m in TOP_P_MASSES]
    rows = []
    for name, truncate in schemes:
        raw, zstd, width, mass = measure(probs, truncate, gamma, level, seed, index_coding)
        rows.append(Row(name, width, mass, raw, zstd))
    return rows


def downlink_bytes(gamma: int, tokens_per_round: float) -> int:
    """Bytes of a typical VerifyResult (chain, ``round(tokens_per_round) - 1`` accepted)."""
    accepted = max(0, min(gamma, round(tokens_per_round) - 1))
    msg = VerifyResult("session-0", BASE_POSITION, accepted, [QWEN_VOCAB - 1] * (accepted + 1),
                       [i < accepted for i in range(gamma)])
    return len(codec.encode(msg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m specmesh.benchmarks.wire_bytes",
        description="Bytes per drafted position and per generated token of the DraftProposal uplink "
                    "message for dense fp32 q, top-K and top-p sparse q, with and without zstd.")
    parser.add_argument("--draft", metavar="DIR",
                        help="Hugging Face model directory of the draft (loaded in bf16); default: a "
                             "synthetic heavy-tailed distribution over 151,936 tokens")
    parser.add_argument("--text", default=DEFAULT_TEXT,
                        help="text fed to --draft (a path to a file is read); default: a short code "
                             "and prose sample")
    parser.add_argument("--positions", type=int, default=DEFAULT_POSITIONS,
                        help=f"drafted positions to measure (default {DEFAULT_POSITIONS})")
    parser.add_argument("--gamma", type=int, default=DEFAULT_GAMMA,
                        help=f"drafted positions per round (default {DEFAULT_GAMMA})")
    parser.add_argument("--tokens-per-round", type=float, default=DEFAULT_TOKENS_PER_ROUND,
                        help="ASSUMED mean tokens committed per round, accepted plus bonus (an input, "
                             f"not measured here; default {DEFAULT_TOKENS_PER_ROUND})")
    parser.add_argument("--vocab-size", type=int, default=QWEN_VOCAB,
                        help=f"vocabulary of the synthetic source (default {QWEN_VOCAB})")
    parser.add_argument("--zstd-level", type=int, default=codec.DEFAULT_CONFIG.compress_level,
                        help="zstd level of the 'zstd' columns (default %(default)s)")
    parser.add_argument("--index-coding", choices=list(codec.INDEX_CODINGS),
                        default=codec.DEFAULT_CONFIG.index_coding,
                        help="wire coding of sparse token ids (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of every draw")
    args = parser.parse_args(argv)
    if args.gamma < 1 or args.positions < args.gamma or args.tokens_per_round <= 0:
        parser.error("need gamma >= 1, positions >= gamma and tokens-per-round > 0")
    torch.set_num_threads(1)  # shared CPU machines; encoding is single-threaded anyway

    if args.draft:
        text = open(args.text).read() if os.path.isfile(args.text) else args.text
        probs, source = model_probs(args.draft, text, args.positions), f"draft model {args.draft}"
    else:
        probs = synthetic_probs(args.positions, args.vocab_size, args.seed)
        source = f"SYNTHETIC heavy-tailed distributions (vocab {args.vocab_size}; no --draft given)"
    top1 = probs.max(dim=-1).values.mean().item()
    print(f"source: {source}")
    print(f"positions: {probs.shape[0] - probs.shape[0] % args.gamma}, gamma {args.gamma}, mean top-1 "
          f"probability {top1:.3f}, zstd level {args.zstd_level}, q probabilities float16 (dense: fp32), "
          f"sparse ids {args.index_coding}")
    print(f"per generated token = per round / {args.tokens_per_round} tokens per round (ASSUMED)\n")
    rows = build_table(probs, args.gamma, args.zstd_level, args.seed, args.index_coding)
    per_token = args.gamma / args.tokens_per_round
    header = (f"{'scheme':<12} {'entries':>8} {'mass kept':>9} {'B/pos raw':>10} {'B/pos zstd':>10} "
              f"{'B/tok raw':>10} {'B/tok zstd':>10}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row.scheme:<12} {row.mean_width:>8.1f} {row.mass_kept:>9.4f} {row.raw:>10.1f} "
              f"{row.zstd:>10.1f} {row.raw * per_token:>10.1f} {row.zstd * per_token:>10.1f}")
    down = downlink_bytes(args.gamma, args.tokens_per_round)
    print(f"\ndownlink VerifyResult: {down} B per round = {down / args.tokens_per_round:.1f} B per "
          "generated token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
