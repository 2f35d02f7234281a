"""Batched rounds end to end, in process: concurrent sessions share stage forwards and each still
generates exactly what it generates alone."""
from __future__ import annotations

import pytest
import torch

from specmesh.actors.batched_draft import BatchedDraftWorker
from specmesh.actors.draft import DraftWorker
from specmesh.runtime import SpecConfig, SpecMesh

torch.set_num_threads(1)
# Twelve sessions of different prompt lengths.
PROMPTS = [[(7 * k + 3 * i) % 256 for i in range(3 + 2 * k)] for k in range(12)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = SpecConfig(target="tiny", draft="tiny-draft:noise=0.02", dtype="float32",
                     cache_dir=str(tmp_path_factory.mktemp("models")), max_new_tokens=24, num_stages=2,
                     batch_sessions=16)
    with SpecMesh(cfg) as built:
        yield built


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0, seed=5),
                                dict(temperature=1.0, seed=9, tree_width=2), dict(temperature=0.0, tree_width=3)])
def test_concurrent_sessions_equal_their_solo_runs(engine, kw):
    solo = [engine.generate(p, **kw) for p in PROMPTS]
    before = [dict(s) for s in engine.backend.target.batch_stats()] + [engine.backend.drafter.worker.batch_stats()]
    many = engine.generate_many(PROMPTS, **kw)
    assert [r.output_ids for r in many] == [r.output_ids for r in solo]
    assert [r.stats.bytes_up for r in many] == [r.stats.bytes_up for r in solo]  # each its own bytes
    assert [r.stats.bytes_down for r in many] == [r.stats.bytes_down for r in solo]
    after = engine.backend.target.batch_stats() + [engine.backend.drafter.worker.batch_stats()]
    assert len(after) == 3  # two stages and the draft
    for stage_before, stage_after in zip(before, after):
        batched = {n: c - stage_before.get(n, 0) for n, c in stage_after.items() if n > 1}
        assert sum(batched.values()) > 0, f"no batch of more than one session ran: {stage_after}"


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_low_bit_workers_batch(tmp_path_factory, weights):
    """Every weight format computes a row on its own, so low-bit drafts and stages batch across
    sessions, and each session's hidden states in a batched forward are its solo ones up to the
    format's rounding: the padded attention sums in another order (float32, ~1e-7), and int4's bf16
    activations or int8's per-row quantisation may then round a value one step apart, so a sampled
    or near-tie token can differ from the solo run (dense float32 stays equal: the test above)."""
    from specmesh.actors import batched, hf, lowbit, tiny

    path = tiny.materialise("tiny", tmp_path_factory.mktemp("models"))
    stage = hf.load_stage(path, dtype=None)
    lowbit.apply(stage.module, weights, lowbit.STAGE_WORK, torch.float32)
    fed, solo = [], []
    for prompt in PROMPTS[:6]:
        ids, pos = torch.tensor(prompt), torch.arange(len(prompt))
        solo.append(hf.forward(stage, stage.new_cache(), input_ids=ids, position_ids=pos))  # [n, H]
        fed.append(batched.Fed(stage.new_cache(), pos, input_ids=ids))
    together = batched.forward_many(stage, fed)
    for a, b in zip(together, solo):
        assert a.shape == b.shape and float((a - b).abs().max()) < 0.05 * float(b.abs().max())
    cfg = SpecConfig(target="tiny", draft="tiny-draft:noise=0.02", dtype="float32", weights=weights,
                     draft_weights=weights, cache_dir=str(tmp_path_factory.mktemp("models")), max_new_tokens=16,
                     batch_sessions=8)
    with SpecMesh(cfg) as built:
        assert type(built.backend.drafter.worker) is BatchedDraftWorker
        many = built.generate_many(PROMPTS[:8], temperature=1.0, seed=3)
        assert all(r.output_ids and r.finish_reason in ("length", "eos") for r in many)
        assert any(n > 1 for n in built.backend.drafter.worker.batch_stats())
        assert any(n > 1 for stage_stats in built.backend.target.batch_stats() for n in stage_stats)


def test_batching_off_steps_each_round_alone(tmp_path_factory):
    cfg = SpecConfig(target="tiny", draft="tiny-draft", dtype="float32", num_stages=2,
                     cache_dir=str(tmp_path_factory.mktemp("models")), max_new_tokens=8, batch_sessions=1)
    with SpecMesh(cfg) as off:
        assert off.backend.target.batchers is None and off.backend.target.batch_stats() == []
        assert type(off.backend.drafter.worker) is DraftWorker
        assert len(off.generate_many(PROMPTS[:3])) == 3


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_batch_sessions_is_validated(bad):
    with pytest.raises(ValueError, match=f"batch_sessions must be an integer >= 1 \\(1 = off\\), got {bad!r}"):
        SpecConfig(batch_sessions=bad)


def test_batch_sessions_is_fixed_when_the_engine_is_built(engine):
    with pytest.raises(ValueError, match=r"\['batch_sessions'\] are fixed"):
        engine.generate(PROMPTS[0], batch_sessions=4)
