"""Every call into Hugging Face transformers lives here (transformers moves fast: one place to adapt).

A *stage model* is a causal LM restricted to a contiguous slice of decoder layers: the first stage
also holds the embeddings, the last stage the final norm and the LM head; a draft model is simply the
one stage that holds everything. It is built on the meta device from a sliced config and filled with
only the tensors it owns, read key by key from safetensors, so a stage never materialises layers it
does not own.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PretrainedConfig

from . import hardware

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, weights: str = "dense") -> torch.dtype:
    """Maps a dtype name ("auto", "float32", "bfloat16", "float16") to torch, with a clear error.

    "auto" with dense weights is bf16 where this CPU computes bf16 natively
    (:func:`hardware.native_bf16`: AVX512-BF16 or AMX flags, and oneDNN's bf16 kernels), float32
    elsewhere: on an AVX2-only CPU bf16 matrix products are emulated and scale with the token count
    (16 tokens in one forward 3984 ms in bf16, 1276 ms in fp32), while with AVX512-BF16 bf16 is 2-4x
    faster than fp32. With low-bit ``weights`` (``actors/lowbit.py``) the matrix products are
    integer kernels and what the dtype still decides (attention, norms, the KV cache) is faster in
    float32: the bundled 0.5B's decode step with int4 weights, one thread of an AVX512-BF16 EPYC,
    spent 11.1 ms in bf16 attention against 2.6 ms in float32. The models run on the CPU, so a GPU
    in the machine does not enter the decision.
    """
    if name == "auto":
        if weights != "dense":
            return torch.float32
        return torch.bfloat16 if hardware.native_bf16() else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {['auto', *sorted(_DTYPES)]}, got {name!r}") from None


def load_config(model_dir: str | Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(str(model_dir))


def num_layers(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


def _sliced_config(config: PretrainedConfig, layers: range) -> PretrainedConfig:
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(layers)
    # Pitfall: a sliced config must slice layer_types too, or layer i gets the wrong attention kind.
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [config.layer_types[i] for i in layers]
    return cfg


def _safetensors_index(model_dir: Path) -> dict[str, Path]:
    """Maps every tensor name to the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {model_dir}")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f for k in h.keys()})
    return out


@dataclass
class StageModel:
    """A loaded slice of a causal LM.

    Attributes:
        module: the ``*ForCausalLM`` module; absent parts are ``None`` / identity.
        config: the sliced config (``num_hidden_layers == len(layers)``).
        layers: global indices of the decoder layers held.
        is_first: holds the embeddings (takes token ids).
        is_last: holds the final norm and LM head (produces logits).
        vocab_size: rows of the LM head / embedding.
        formats: linear layers per weight format, once :func:`specmesh.actors.lowbit.apply` ran.
    """

    module: torch.nn.Module
    config: PretrainedConfig
    layers: range
    is_first: bool
    is_last: bool
    vocab_size: int
    # How many linear layers run in each weight format (``actors/lowbit.py``), once applied.
    formats: dict[str, int] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)


def load_stage(
    model_dir: str | Path,
    layers: range | None = None,
    *,
    is_first: bool | None = None,
    is_last: bool | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
) -> StageModel:
    """Loads decoder ``layers`` of the model in ``model_dir`` (HF layout, safetensors weights).

    Args:
        model_dir: directory with ``config.json`` and ``*.safetensors``.
        layers: global layer indices to hold; all layers when None.
        is_first / is_last: default to whether ``layers`` starts at 0 / ends at the last layer.
        dtype: parameter dtype; None keeps each tensor's dtype in the file (a model about to be
            converted to a low-bit format: no copy in another dtype is made first).
    """
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    total = num_layers(config)
    layers = range(total) if layers is None else layers
    if len(layers) < 1 or layers.start < 0 or layers.stop > total or layers.step != 1:
        raise ValueError(f"layers {layers} must be a non-empty contiguous slice of range({total})")
    is_first = layers.start == 0 if is_first is None else is_first
    is_last = layers.stop == total if is_last is None else is_last
    cfg = _sliced_config(config, layers)
    with torch.device("meta"):
        module = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32, attn_implementation="sdpa")
    state = _read_owned_tensors(model_dir, config, layers, is_first, is_last, dtype)
    inner = module.model
    if not is_first:
        inner.embed_tokens = None
    if not is_last:
        inner.norm = torch.nn.Identity()
        module.lm_head = None
    module.load_state_dict(state, strict=True, assign=True)
    # Rotary inv_freq is a non-persistent buffer: it is not in the file and is still on meta.
    inner.rotary_emb = type(inner.rotary_emb)(config=cfg)
    module.eval()
    return StageModel(module, cfg, layers, is_first, is_last, int(config.vocab_size))


def _read_owned_tensors(
    model_dir: Path, config: PretrainedConfig, layers: range, is_first: bool, is_last: bool,
    dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    index = _safetensors_index(model_dir)
    wanted: dict[str, str] = {}  # file key -> module key
    for key in index:
        m = _LAYER_KEY.match(key)
        if m:
            g = int(m.group(1))
            if g in layers:
                wanted[key] = f"model.layers.{g - layers.start}.{m.group(2)}"
        elif key == "model.embed_tokens.weight":
            if is_first:
                wanted[key] = key
            if is_last and "lm_head.weight" not in index:
                wanted.setdefault(key, key)
        elif key == "model.norm.weight" and is_last:
            wanted[key] = key
        elif key == "lm_head.weight" and is_last:
            wanted[key] = key
    by_file: dict[Path, list[str]] = {}
    for key in wanted:
        by_file.setdefault(index[key], []).append(key)
    state: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt") as h:
            for key in keys:
                tensor = h.get_tensor(key)
                state[wanted[key]] = tensor if dtype is None else tensor.to(dtype)
    if is_last and "lm_head.weight" not in state:
        # Tied embeddings: the head reads the embedding's rows (shared when this stage has both).
        embed = state["model.embed_tokens.weight"] if is_first else state.pop("model.embed_tokens.weight")
        state["lm_head.weight"] = embed
    missing = [k for k in ("model.norm.weight",) if is_last and k not in state]
    if missing:
        raise ValueError(f"{model_dir} lacks tensors {missing}")
    return state


@torch.inference_mode()
def forward(
    stage: StageModel,
    cache: DynamicCache,
    *,
    input_ids: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Runs the stage's layers over new tokens, appending their keys/values to ``cache``.

    Args:
        input_ids: ``[n]`` token ids (first stage).
        hidden: ``[n, hidden_size]`` hidden states from the previous stage (other stages).
        position_ids: ``[n]`` absolute positions.
        attention_mask: optional additive ``[1, 1, n, cached + n]`` mask (trees); causal if None.
    Returns:
        ``[n, hidden_size]`` hidden states (after the final norm on the last stage).
    """
    kwargs = dict(
        position_ids=position_ids.view(1, -1), cache=cache, use_cache=True,
        attention_mask=attention_mask,
    )
    if stage.is_first:
        out = stage.module.model(input_ids=input_ids.view(1, -1), **kwargs)
    else:
        out = stage.module.model(inputs_embeds=hidden.to(stage.dtype).unsqueeze(0), **kwargs)
    return out.last_hidden_state[0]


@torch.inference_mode()
def lm_head(stage: StageModel, hidden: torch.Tensor) -> torch.Tensor:
    """``[n, hidden_size]`` -> ``[n, vocab]`` float32 logits (last stage only)."""
    return stage.module.lm_head(hidden).float()


def cache_length(cache: DynamicCache) -> int:
    return int(cache.get_seq_length())


def truncate_cache(cache: DynamicCache, keep: int) -> None:
    """Keeps the first ``keep`` positions of every layer (rollback is setting a length)."""
    length = cache_length(cache)
    if keep > length:
        raise ValueError(f"cannot roll back to {keep}: cache holds only {length} positions")
    if keep < length:
        cache.crop(keep - length)  # transformers 5.x: a negative count of tokens to remove


def select_cache_positions(cache: DynamicCache, positions: torch.Tensor) -> None:
    """Keeps only ``positions`` (``[m]`` int64, increasing) of every layer: tree path compaction."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(-2, positions)
            layer.values = layer.values.index_select(-2, positions)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def has_tokenizer(model_dir: str | Path) -> bool:
    return any((Path(model_dir) / f).exists() for f in _TOKENIZER_FILES)


def load_tokenizer(model_dir: str | Path):
    """The model's tokenizer, or None when the directory has none (tiny random models)."""
    if not has_tokenizer(model_dir):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def generation_eos(model_dir: str | Path) -> tuple[int, ...]:
    """End-of-sequence ids from ``generation_config.json`` (chat models add ``<|im_end|>`` there)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


def vocab_strings(tok, vocab_size: int) -> list[str] | None:
    """Each token id's decoded text (``vocab_size`` entries, "" past the tokenizer's own), for
    acceptance rules that score tokens lexically; None when there is no tokenizer (``tok`` None)."""
    if tok is None:
        return None
    known = min(vocab_size, len(tok))
    return [tok.decode([i]) for i in range(known)] + [""] * (vocab_size - known)


# The end-of-document token of GPT-2-style byte-level BPE vocabularies (GPT-2, Qwen, ...): a model
# that emits it has finished, whatever its generation config lists (the bundled GGUF conversion
# keeps only <|im_end|>, so the Qwen coders ran past <|endoftext|> on plain-code prompts).
DOCUMENT_END = "<|endoftext|>"


def document_end_ids(tok) -> tuple[int, ...]:
    """The id of the tokenizer's end-of-document special token, when it has one (``tok``: a
    loaded tokenizer, or None)."""
    if tok is None or DOCUMENT_END not in tok.all_special_tokens:
        return ()
    return (int(tok.convert_tokens_to_ids(DOCUMENT_END)),)
