"""GGUF -> bf16 safetensors: load a GGUF through transformers (dequantised) and save a plain model."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from .cache import ModelCacheError
from .manifest import FILE_MODE

#: Largest safetensors shard written; large enough that the bundled models fit in one file.
MAX_SHARD_SIZE = "20GB"


def convert_gguf(gguf_path: Path, out_dir: Path, *, label: str) -> None:
    """Load a GGUF through transformers (dequantised to bf16) and save safetensors + tokenizer.

    The GGUF loader leaves a quantisation config and quantizer on the model; both are removed
    before ``save_pretrained``, which otherwise refuses (or records a quantisation that the saved
    bf16 weights no longer have).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    load_kwargs: dict[str, Any] = {}
    try:  # transformers >= 5 can keep GGUF blocks packed; we want a plain dense bf16 model.
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # pragma: no cover - older transformers always dequantise
        pass
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.bfloat16, **load_kwargs
    )
    bad = {n: p.dtype for n, p in model.named_parameters() if p.dtype != torch.bfloat16}
    if bad:
        first = next(iter(bad.items()))
        raise ModelCacheError(
            f"GGUF load of {label} left {len(bad)} parameter(s) not in bfloat16, e.g. {first}"
        )
    # Pitfall: save_pretrained of a GGUF-loaded model needs the quantisation config removed.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with contextlib.suppress(AttributeError):
        model.is_quantized = False
    model.config.name_or_path = label
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.name_or_path = label
    tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None and not (out_dir / "generation_config.json").exists():
        model.generation_config.save_pretrained(out_dir)
    del model
    for f in out_dir.iterdir():  # a shared cache: readable by every user, like a normal download
        f.chmod(FILE_MODE)

