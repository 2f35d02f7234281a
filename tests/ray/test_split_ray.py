"""Split verification (DSSD) on local Ray: the verdict's pending correction crosses to the draft
actor as a codec frame, and the output equals in-process target-side verification, seed for seed."""
from __future__ import annotations

import pytest

from specmesh.runtime import SpecConfig, SpecMesh

PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 128, 64]


@pytest.fixture(scope="module")
def engines(local_ray, model_cache):
    base = dict(target="tiny", draft="tiny-draft", dtype="float32", cache_dir=model_cache, threads=1,
                max_new_tokens=24, num_stages=2)
    local, inproc = SpecMesh(SpecConfig(backend="local", **base)), SpecMesh(SpecConfig(**base))
    yield local, inproc
    local.close()
    inproc.close()


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0, seed=3)], ids=["greedy", "sampled"])
def test_split_on_ray_equals_target_side_in_process(engines, kw):
    local, inproc = engines
    want = inproc.generate(PROMPT, **kw)
    got = local.generate(PROMPT, verification="split", **kw)
    assert got.output_ids == want.output_ids
    assert got.stats.accepted < got.stats.drafted  # rejections: the draft actor drew corrections
    assert got.stats.bytes_up < want.stats.bytes_up


def test_a_bad_resolve_frame_is_refused_by_the_draft_actor(engines):
    import ray

    local, _ = engines
    with pytest.raises(ray.exceptions.RayTaskError, match="VerifyResult frame"):
        ray.get(local.backend.drafter.actor.resolve.remote(b"not bytes of a frame".decode()), timeout=60)
