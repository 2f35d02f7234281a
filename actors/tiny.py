"""Tiny random models built from configs: fast tests and the ``--quick`` benchmarks.

A spec string names one: ``tiny`` (the target), ``tiny:seed=3,layers=6``, or a *noisy draft*
``tiny-draft:noise=0.05,draft_layers=2`` = the first ``draft_layers`` decoder layers of the tiny target with the
same seed, every weight perturbed by Gaussian noise of ``noise`` times its own standard deviation. The
draft therefore agrees with the target often but not always: the deliberately imperfect draft that the
lossless tests need. Models are written once (HF layout, safetensors) under a cache directory, keyed by
the spec, so every worker loads them through the same code path as real models.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

TARGET_PREFIX = "tiny"
DRAFT_PREFIX = "tiny-draft"


@dataclass(frozen=True)
class TinySpec:
    """A tiny Qwen2-architecture model.

    Attributes:
        vocab: vocabulary size (HF's causal LM tester uses 99).
        hidden: hidden size.
        layers: decoder layers of the target.
        heads / kv_heads: attention heads (grouped-query when kv_heads < heads).
        intermediate: MLP width.
        seed: seed of the target's weights.
        init_std: weight init std; larger than HF's 0.02 so distributions are peaked like a real LM's.
        draft_layers: for a draft, how many of the target's first layers it keeps (0 = not a draft).
        noise: for a draft, Gaussian noise scale relative to each tensor's std.
        max_positions: context length.
    """

    vocab: int = 256
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    seed: int = 0
    init_std: float = 0.25
    draft_layers: int = 0
    noise: float = 0.0
    max_positions: int = 512

    def __post_init__(self) -> None:
        if self.draft_layers > self.layers:
            raise ValueError(f"draft_layers {self.draft_layers} > target layers {self.layers}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads} do not divide")

    @property
    def is_draft(self) -> bool:
        return self.draft_layers > 0

    def key(self) -> str:
        return hashlib.sha1(repr(self).encode()).hexdigest()[:12]


def is_tiny(name: str) -> bool:
    return name == TARGET_PREFIX or name.startswith((TARGET_PREFIX + ":", DRAFT_PREFIX))


def parse(name: str) -> TinySpec:
    """Parses ``tiny[:k=v,...]`` or ``tiny-draft[:k=v,...]`` into a :class:`TinySpec`."""
    head, _, rest = name.partition(":")
    if head not in (TARGET_PREFIX, DRAFT_PREFIX):
        raise ValueError(f"not a tiny model spec: {name!r} (want 'tiny[:k=v,...]' or 'tiny-draft[:...]')")
    fields = {f.name: f.type for f in dataclasses.fields(TinySpec)}
    values: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq or k not in fields:
            raise ValueError(f"bad tiny spec entry {item!r} in {name!r}; keys: {sorted(fields)}")
        values[k] = float(v) if k in ("init_std", "noise") else int(v)
    if head == DRAFT_PREFIX:
        # Defaults measured on 64 random tokens: argmax agreement ~50%, alpha ~0.66.
        values.setdefault("draft_layers", values.get("layers", TinySpec.layers))
        values.setdefault("noise", 0.05)
    return TinySpec(**values)


def build_module(spec: TinySpec) -> torch.nn.Module:
    """Builds the model in fp32 (deterministic in ``spec.seed``)."""
    config = Qwen2Config(
        vocab_size=spec.vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.intermediate, max_position_embeddings=spec.max_positions,
        initializer_range=spec.init_std, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=spec.vocab - 1, pad_token_id=None,
    )
    gen = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * spec.init_std)
    if not spec.is_draft:
        return model
    # A draft: the first draft_layers layers of the target, perturbed.
    dcfg = Qwen2Config(**{
        **config.to_dict(), "num_hidden_layers": spec.draft_layers,
        "layer_types": config.layer_types[: spec.draft_layers],
    })
    draft = AutoModelForCausalLM.from_config(dcfg, dtype=torch.float32)
    src = model.state_dict()
    noise_gen = torch.Generator().manual_seed(spec.seed + 1_000_003)
    with torch.no_grad():
        for name, p in draft.state_dict().items():
            t = src[name]
            p.copy_(t + torch.randn(t.shape, generator=noise_gen) * spec.noise * t.std().clamp_min(1e-6)
                    if t.numel() > 1 else t)
    return draft


def materialise(name: str, cache_dir: str | Path) -> Path:
    """Writes the tiny model named by ``name`` under ``cache_dir`` once; returns its directory."""
    spec = parse(name)
    target_spec = dataclasses.replace(spec, draft_layers=0, noise=0.0)
    out = Path(cache_dir) / "tiny" / spec.key()
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    model = build_module(spec if spec.is_draft else target_spec)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".building-"))
    model.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: a concurrent builder of the same spec just loses the race
    except OSError:
        pass
    return out
