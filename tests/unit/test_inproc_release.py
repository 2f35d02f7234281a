"""Closing an in-process engine frees its models even while the engine object lives on."""
from __future__ import annotations

import gc
import weakref

import pytest

from specmesh.runtime import SpecConfig, SpecMesh


def test_close_releases_the_models_and_later_use_says_the_engine_is_closed(tmp_path):
    engine = SpecMesh(SpecConfig(target="tiny", draft="tiny", dtype="float32", num_stages=2,
                                 cache_dir=str(tmp_path), max_new_tokens=8))
    assert len(engine.generate([5, 17, 42]).output_ids) == 8
    stages = [weakref.ref(s) for s in engine.backend.target.stages]
    draft = weakref.ref(engine.backend.drafter.worker)
    engine.close()
    engine.close()  # twice is fine
    gc.collect()
    assert all(s() is None for s in stages) and draft() is None
    with pytest.raises(RuntimeError, match="engine is closed"):
        engine.generate([5, 17, 42])
