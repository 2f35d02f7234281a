"""Batched rounds through the Ray actors (local Ray, tiny fp32 models): concurrent sessions share
the stage actors' and the draft actor's forwards, and each still generates its solo output."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

from specmesh.runtime import SpecConfig, SpecMesh

pytestmark = pytest.mark.ray
torch.set_num_threads(1)
PROMPTS = [[(11 * k + 5 * i) % 250 + 1 for i in range(4 + 3 * (k % 5))] for k in range(12)]


@pytest.fixture(scope="module")
def engine(local_ray, model_cache):
    cfg = SpecConfig(target="tiny", draft="tiny-draft:noise=0.02", dtype="float32",
                     cache_dir=model_cache, threads=1, num_stages=2, max_new_tokens=20, backend="local",
                     batch_sessions=16)
    with SpecMesh(cfg) as built:
        yield built


def _batch_stats(engine) -> list[dict[int, int]]:
    handles = [*engine.backend.target.stages, engine.backend.target.draft.handle]
    return ray.get([h.batch_stats.remote() for h in handles], timeout=60)


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0, seed=3),
                                dict(temperature=1.0, seed=8, tree_width=2)])
def test_concurrent_sessions_through_the_actors_equal_their_solo_runs(engine, kw):
    solo = [engine.generate(p, **kw) for p in PROMPTS]
    before = _batch_stats(engine)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: engine.generate(p, **kw), PROMPTS))
    assert [r.output_ids for r in together] == [r.output_ids for r in solo]
    # Each session's frames are still counted on their own links (the hidden states between stages
    # differ in their last bits when batched, and so do their compressed sizes, by a few bytes).
    assert [r.stats.bytes_up for r in together] == [r.stats.bytes_up for r in solo]
    assert [r.stats.bytes_down for r in together] == [r.stats.bytes_down for r in solo]
    for r, alone in zip(together, solo):
        assert abs(r.stats.bytes_between_stages - alone.stats.bytes_between_stages) <= 0.02 * alone.stats.bytes_between_stages
    after = _batch_stats(engine)
    for role, b, a in zip(("stage0", "stage1", "draft"), before, after):
        grown = {n: c - b.get(n, 0) for n, c in a.items() if n > 1 and c > b.get(n, 0)}
        assert grown, f"{role} ran no batch of more than one session: {a}"
    handles = [*engine.backend.target.stages, engine.backend.target.draft.handle]
    assert ray.get([h.open_sessions.remote() for h in handles], timeout=60) == [0] * len(handles)


def test_an_error_in_one_session_leaves_the_batch_to_the_others(engine):
    """A session whose stage state is gone fails alone; the sessions batched with it finish."""
    good = engine.generate(PROMPTS[0])
    real_open = engine.backend.target.open

    def open_then_lose_stage1(msg):
        real_open(msg)
        if msg.session_id.endswith("lost"):
            ray.get(engine.backend.target.stages[1].close.remote(msg.session_id), timeout=60)

    engine.backend.target.open = open_then_lose_stage1
    try:
        def run(i):
            try:
                return engine.generation(PROMPTS[0], session_id=f"s{i}-{'lost' if i == 2 else 'ok'}")
            except Exception as exc:  # noqa: BLE001
                return exc

        gens = [run(i) for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(lambda g: _finish(g), gens))
    finally:
        engine.backend.target.open = real_open
    assert "no open session 's2-lost'" in str(outcomes[2])
    assert [o for i, o in enumerate(outcomes) if i != 2] == [good.output_ids] * 5


def _finish(gen):
    try:
        gen.run()
        return gen.output_ids
    except Exception as exc:  # noqa: BLE001
        return exc
