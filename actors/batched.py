"""Several sessions' tokens through one stage in one forward (batched rounds across sessions).

Each session brings its own KV cache (``L_i`` positions, already rolled back), its ``n_i`` fed
tokens (ids on the first stage, hidden states elsewhere), their positions and, for a tree round,
its tree mask. One forward serves them all: the caches are stacked into one batch, padded to
``Lmax`` positions, the fed tokens padded to ``nmax``, and a 4D additive mask
``[B, 1, nmax, Lmax + nmax]`` gives every row exactly what its own forward would see: its session's
``L_i`` cached columns and its causal (or tree) view of its session's new columns. A padded row sees
its own column only, so no row is all ``-inf``. Afterwards each session's new keys/values (columns
``Lmax .. Lmax + n_i``) are appended to its own cache, and its hidden-state rows are handed back.
Per session, the result equals a forward of its own up to float rounding.

Like ``hf.py`` this module calls into transformers (the model and its ``DynamicCache``): keep the
two in step when transformers changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache

from . import hf


@dataclass(frozen=True)
class Fed:
    """One session's part of a batched forward.

    Attributes:
        cache: the session's KV cache (``L`` positions); the new positions are appended to it.
        positions: ``[n]`` int64 absolute positions of the fed tokens.
        mask: ``[1, 1, n, L + n]`` additive mask in the model dtype (a tree round), or None (causal).
        input_ids: ``[n]`` int64 token ids (first stage), else None.
        hidden: ``[n, hidden_size]`` hidden states from the previous stage (later stages), else None.
    """

    cache: DynamicCache
    positions: torch.Tensor
    mask: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    @property
    def num_fed(self) -> int:
        return int(self.positions.numel())


def batch_mask(lengths: Sequence[int], masks: Sequence[torch.Tensor | None], fed: Sequence[int],
               dtype: torch.dtype) -> torch.Tensor:
    """The additive mask ``[B, 1, nmax, Lmax + nmax]`` of a batched forward.

    Args:
        lengths: ``L_i``, cached positions of each session.
        masks: each session's ``[1, 1, n_i, L_i + n_i]`` mask, or None for causal.
        fed: ``n_i``, fed tokens of each session.
        dtype: the model dtype; hidden cells hold ``finfo(dtype).min``.
    """
    lmax, nmax = max(lengths), max(fed)
    hidden = torch.finfo(dtype).min
    out = torch.full((len(fed), 1, nmax, lmax + nmax), hidden, dtype=dtype)
    for i, (length, n, mask) in enumerate(zip(lengths, fed, masks)):
        if mask is None:
            out[i, 0, :n, :length] = 0.0
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            out[i, 0, :n, lmax : lmax + n].masked_fill_(causal, 0.0)
        else:
            if tuple(mask.shape) != (1, 1, n, length + n):
                raise ValueError(f"mask of session {i} has shape {tuple(mask.shape)}, want (1, 1, {n}, {length + n})")
            out[i, 0, :n, :length] = mask[0, 0, :, :length]
            out[i, 0, :n, lmax : lmax + n] = mask[0, 0, :, length:]
        pad = torch.arange(n, nmax)
        out[i, 0, pad, lmax + pad] = 0.0  # a padded row sees itself: never a row of only -inf
    return out


def _layers(cache: DynamicCache) -> list:
    layers = cache.layers
    if any(getattr(layer, "is_sliding", False) for layer in layers):
        raise ValueError("batched forwards support full-attention caches only (no sliding window)")
    return layers


def _stacked_cache(stage: hf.StageModel, fed: Sequence[Fed], lengths: list[int]) -> DynamicCache:
    """One cache holding every session's keys/values, padded with zeros to ``Lmax`` positions."""
    batch = DynamicCache(config=stage.config)
    lmax = max(lengths)
    if lmax == 0:
        return batch
    per_session = [_layers(f.cache) for f in fed]
    for index in range(len(per_session[0])):
        ref = next(p[index] for p, length in zip(per_session, lengths) if length)
        _, heads, _, dim = ref.keys.shape
        keys = ref.keys.new_zeros(len(fed), heads, lmax, dim)  # [B, kv_heads, Lmax, head_dim]
        values = ref.values.new_zeros(len(fed), heads, lmax, dim)
        for i, (layers, length) in enumerate(zip(per_session, lengths)):
            if length:
                keys[i, :, :length] = layers[index].keys[0]
                values[i, :, :length] = layers[index].values[0]
        batch.update(keys, values, index)
    return batch


@torch.inference_mode()
def forward_many(stage: hf.StageModel, fed: Sequence[Fed]) -> list[torch.Tensor]:
    """Runs the stage's layers over every session's fed tokens in one forward.

    Returns:
        per session, ``[n_i, hidden_size]`` hidden states (after the final norm on the last stage);
        each session's cache has grown by its ``n_i`` positions.
    """
    if not fed:
        return []
    lengths = [hf.cache_length(f.cache) for f in fed]
    counts = [f.num_fed for f in fed]
    if min(counts) < 1:
        raise ValueError(f"every session must feed at least one token, got counts {counts}")
    lmax, nmax, batch = max(lengths), max(counts), len(fed)
    positions = torch.zeros(batch, nmax, dtype=torch.int64)  # [B, nmax]
    for i, f in enumerate(fed):
        positions[i, : counts[i]] = f.positions
        positions[i, counts[i] :] = f.positions[-1]  # padding: any position, its rows are discarded
    mask = batch_mask(lengths, [f.mask for f in fed], counts, stage.dtype)
    cache = _stacked_cache(stage, fed, lengths)
    kwargs = dict(position_ids=positions, cache=cache, use_cache=True, attention_mask=mask)
    if stage.is_first:
        ids = torch.zeros(batch, nmax, dtype=torch.int64)  # [B, nmax]; padding id 0 is a real token
        for i, f in enumerate(fed):
            ids[i, : counts[i]] = f.input_ids
        out = stage.module.model(input_ids=ids, **kwargs).last_hidden_state  # [B, nmax, H]
    else:
        width = fed[0].hidden.shape[-1]
        states = torch.zeros(batch, nmax, width, dtype=stage.dtype)  # [B, nmax, H]
        for i, f in enumerate(fed):
            states[i, : counts[i]] = f.hidden.to(stage.dtype)
        out = stage.module.model(inputs_embeds=states, **kwargs).last_hidden_state
    for index, layer in enumerate(cache.layers):
        for i, f in enumerate(fed):  # this session's new columns, appended to its own cache
            span = slice(lmax, lmax + counts[i])
            f.cache.update(layer.keys[i : i + 1, :, span], layer.values[i : i + 1, :, span], index)
    return [out[i, : counts[i]] for i in range(batch)]


# A session feeding more than this many tokens (a prefill: its whole prompt) and several times the
# batch's typical count runs in a forward of its own: batched, every other row would be padded to
# its length, and a forward's cost grows with the padded tokens, not the real ones.
LONG_FED = 32
LONG_RATIO = 4


def padding_groups(counts: Sequence[int]) -> list[list[int]]:
    """Splits a batch by fed-token counts: each long item (more than :data:`LONG_FED` tokens and
    :data:`LONG_RATIO` times the median count) alone, every other item in one group.

    Returns:
        groups of indices into ``counts``, together covering each index once, the batched group
        first (empty groups left out).
    """
    if not counts:
        return []
    median = sorted(counts)[(len(counts) - 1) // 2]
    alone = [n > LONG_FED and n > LONG_RATIO * median for n in counts]
    long = [i for i, a in enumerate(alone) if a]
    short = [i for i, a in enumerate(alone) if not a]
    return ([short] if short else []) + [[i] for i in long]


def forward_alone(stage: hf.StageModel, f: Fed) -> torch.Tensor:
    """One session's forward on its own (``hf.forward``): ``[n, hidden_size]``."""
    kw = {"input_ids": f.input_ids} if stage.is_first else {"hidden": f.hidden}
    return hf.forward(stage, f.cache, position_ids=f.positions, attention_mask=f.mask, **kw)


def forward_grouped(stage: hf.StageModel, fed: Sequence[Fed]) -> list[torch.Tensor]:
    """:func:`forward_many` over :func:`padding_groups`: sessions of similar counts in one forward,
    a prefill among decoding rounds in its own. Same results as :func:`forward_many`."""
    out: list = [None] * len(fed)
    for group in padding_groups([f.num_fed for f in fed]):
        if len(group) == 1:
            hiddens = [forward_alone(stage, fed[group[0]])]
        else:
            hiddens = forward_many(stage, [fed[i] for i in group])
        for i, h in zip(group, hiddens):
            out[i] = h
    return out
