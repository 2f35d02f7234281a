"""The peer: Hugging Face transformers' assisted generation (``generate(..., assistant_model=draft)``).

Loaded from the very directories SpecMesh loads (``specmesh.actors.models.resolve``), in the same
dtype, run greedy in the same process with the same torch thread count, stopping on the same
end-of-sequence ids. Assisted generation keeps transformers' own draft-length defaults: that *is* the
peer. Also here: where two greedy outputs first differ, and whether the reference target saw a near
tie there (bf16 greedy decoding depends on how tokens are batched: a one-token-at-a-time decode and a
forward over the whole prefix may pick different tokens where the top two logits nearly tie).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM

from specmesh.actors import hf

# Two greedy outputs that part where the reference's logits for the two tokens are this close count as
# a near tie: two bf16 steps for logits between 16 and 32 (0.125 each). The margin itself is reported.
NEAR_TIE_LOGITS = 0.25
# assistant settings worth recording (None means transformers' built-in default applied)
_ASSISTANT_FIELDS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


@dataclass(frozen=True)
class PeerRun:
    """One ``generate`` call: the new tokens and its wall time."""

    output_ids: list[int]
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.output_ids) / self.wall_s if self.wall_s else 0.0


class AssistedPeer:
    """Target and draft as plain transformers models.

    Args:
        target_dir / draft_dir: model directories (config.json + safetensors).
        dtype: "bfloat16", "float32" or "float16", as SpecMesh's ``SpecConfig.dtype``.
        eos_token_ids: the ids that end generation (pass SpecMesh's so both stop alike).
    """

    def __init__(self, target_dir: str | Path, draft_dir: str | Path, dtype: str,
                 eos_token_ids: Sequence[int]) -> None:
        torch_dtype = hf.resolve_dtype(dtype)
        self.target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch_dtype).eval()
        self.draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch_dtype).eval()
        self.eos_token_ids = list(eos_token_ids)
        pad = self.target.generation_config.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else (self.eos_token_ids or [0])[0]

    def settings(self) -> dict:
        """The assistant's draft-length settings as configured (for the report)."""
        gc = self.draft.generation_config
        return {k: getattr(gc, k, None) for k in _ASSISTANT_FIELDS}

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, assisted: bool) -> PeerRun:
        """Greedy generation, with the draft as assistant or the target alone."""
        ids = torch.tensor([list(prompt_ids)], dtype=torch.int64)
        extra = {"assistant_model": self.draft} if assisted else {}
        t0 = time.perf_counter()
        out = self.target.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id, **extra,
        )
        wall = time.perf_counter() - t0
        return PeerRun(out[0, ids.shape[1]:].tolist(), wall)

    @torch.inference_mode()
    def next_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """The target's logits for the token after ``ids``, from one forward over all of them. ``[V]``"""
        x = torch.tensor([list(ids)], dtype=torch.int64)
        return self.target(input_ids=x).logits[0, -1].float()


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ, None if one is a prefix of the other."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def compare_outputs(peer, prompt_ids: Sequence[int], a: Sequence[int], b: Sequence[int],
                    decode=None) -> dict:
    """Whether two greedy outputs agree; where not, the reference target's view of the first split.

    Returns:
        ``identical`` (same tokens, same length), ``common_prefix`` (tokens equal before any split),
        and at a split: ``index``, ``token_a``/``token_b`` (and their text when ``decode`` is given),
        ``margin`` (|logit a - logit b| under ``peer.next_logits`` over the shared prefix: an
        :class:`AssistedPeer`, or an in-process engine's target as it runs),
        ``top2_margin`` and ``near_tie`` (margin <= ``NEAR_TIE_LOGITS``).
    """
    i = first_divergence(a, b)
    out: dict = {"identical": list(a) == list(b), "len_a": len(a), "len_b": len(b),
                 "common_prefix": i if i is not None else min(len(a), len(b))}
    if i is None:
        return out
    logits = peer.next_logits(list(prompt_ids) + list(a[:i]))
    top2 = torch.topk(logits, 2).values
    margin = abs(float(logits[a[i]] - logits[b[i]]))
    out.update(index=i, token_a=int(a[i]), token_b=int(b[i]), margin=margin,
               top2_margin=float(top2[0] - top2[1]), near_tie=margin <= NEAR_TIE_LOGITS,
               reference_argmax=int(logits.argmax()))
    if decode is not None:
        out.update(text_a=decode([a[i]]), text_b=decode([b[i]]))
    return out
