"""Where the model cache lives, and the error every part of the model store raises.

A leaf module (no heavy imports), so that resolving a tiny model or listing the cache never loads
transformers or gguf.
"""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs

#: Environment variable that overrides the default cache directory.
CACHE_ENV_VAR = "SPECMESH_CACHE"
#: Application name used for the platform's user cache directory.
APP_NAME = "specmesh"


class ModelCacheError(RuntimeError):
    """A model directory is missing, incomplete or corrupted, or a model cannot be fetched."""


def default_cache_dir() -> Path:
    """``$SPECMESH_CACHE`` if set (``~`` expanded), else the platform's user cache directory."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir(APP_NAME))


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir`` (``~`` expanded) if given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
