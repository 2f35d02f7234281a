"""SpecMesh runtime: the lossless speculative core, the wire schema, the scheduler and the Python API.

Public API (imported lazily so that the math modules stay leaves)::

    from specmesh.runtime import SpecConfig, SpecMesh, generate
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SpecConfig": "specmesh.runtime.config",
    "SpecMesh": "specmesh.runtime.api",
    "GenerationResult": "specmesh.runtime.api",
    "StreamChunk": "specmesh.runtime.api",
    "generate": "specmesh.runtime.api",
    "build_backend": "specmesh.runtime.api",
    "SessionStats": "specmesh.runtime.stats",
    "SamplingParams": "specmesh.runtime.messages",
    "GenerationError": "specmesh.runtime.scheduler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'specmesh.runtime' has no attribute {name!r}")
