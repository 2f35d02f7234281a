"""Weight formats (actors/lowbit.py): what each computes, what auto picks, what a worker keeps, and
that speculation over low-bit workers is still exact relative to the target as it runs."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from specmesh.actors import hf, lowbit, memory, tiny
from specmesh.runtime import SpecConfig, SpecMesh

torch.set_num_threads(1)
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 128, 64]


def _linear(out_f=256, in_f=128, bias=True, seed=0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f, bias=bias).eval().requires_grad_(False)


@pytest.mark.parametrize("fmt, tolerance", [("int8", 0.02), ("int4", 0.1)])
def test_each_format_computes_the_layer_within_its_quantisation(fmt, tolerance):
    dense = _linear()
    layer = lowbit.convert(dense, fmt)
    assert lowbit.format_of(layer) == fmt and lowbit.format_of(dense) == "dense"
    x = torch.randn(2, 9, 128)  # [batch, rows, in]
    want, got = dense(x), layer(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert float((got - want).norm() / want.norm()) < tolerance


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_rows_are_computed_on_their_own(fmt):
    """A row's output is the same whatever is computed beside it (what lets sessions batch)."""
    layer = lowbit.convert(_linear(), fmt)
    x = torch.randn(12, 128) * torch.logspace(-2, 2, 12).unsqueeze(1)  # rows of very different scales
    together = layer(x)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(12)])
    assert torch.equal(together, alone)


def test_int8_keeps_int8_weights_and_per_channel_scales():
    layer = lowbit.Int8Linear(_linear().weight, None)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (256, 128)
    assert layer.scale.shape == (256,) and int(layer.weight.abs().max()) == 127
    assert not list(layer.parameters())  # buffers only: nothing for autograd to keep alive


def test_int4_represents_a_4_bit_group_grid_exactly():
    """Weights already on a 16-level grid per group of 32 (as a GGUF Q4 block is) come back exactly."""
    torch.manual_seed(1)
    q = torch.randint(0, 16, (64, 64)).float()  # [out, in]
    scale = torch.rand(64, 2).repeat_interleave(32, dim=1) + 0.5  # one per group of 32 inputs
    low = -torch.rand(64, 2).repeat_interleave(32, dim=1)
    q[:, ::32], q[:, 1::32] = 0, 15  # every group spans the whole grid
    w = (q * scale + low).to(torch.bfloat16).float()
    layer = lowbit.Int4Linear(w, None)
    eye = torch.eye(64)
    rebuilt = layer(eye).t()  # [out, in]: the weight as the kernel sees it
    assert float((rebuilt - w).abs().max()) <= 0.02 * float(w.abs().max())


def test_int8_embedding_rows():
    table = torch.randn(300, 64)
    emb = lowbit.Int8Embedding(table, torch.float32)
    ids = torch.tensor([[0, 5, 299]])
    got = emb(ids)
    assert got.shape == (1, 3, 64) and got.dtype == torch.float32
    assert torch.allclose(got[0], table[ids[0]], atol=float(table.abs().max()) / 127)


def test_auto_keeps_small_layers_dense_and_explicit_formats_follow_shapes():
    small, odd = _linear(16, 32), _linear(20, 40)
    assert lowbit.choose(small, "auto", lowbit.STAGE_WORK) == "dense"  # under MIN_WEIGHTS
    assert lowbit.choose(small, "int4", lowbit.STAGE_WORK) == "int4"
    assert lowbit.choose(odd, "int4", lowbit.STAGE_WORK) == "dense"  # 40 inputs: no groups of 32
    assert lowbit.choose(odd, "int8", lowbit.STAGE_WORK) == "int8"
    assert lowbit.choose(small, "dense", lowbit.STAGE_WORK) == "dense"


def test_auto_picks_the_fastest_on_the_work_and_prefers_within_the_gain(monkeypatch):
    """The choice weighs each candidate's measured time by the work; a later-preferred format must
    be GAIN times faster to displace an earlier one."""
    ms = {"int8": {1: 1.6, 8: 2.29, 64: 5.7}, "int4": {1: 0.9, 8: 2.7, 64: 21.0}, "dense": {1: 2.7, 8: 3.55, 64: 10.0}}
    monkeypatch.setattr(lowbit, "_seconds", lambda layer, x, scratch: ms[lowbit.format_of(layer)][x.shape[0]])
    monkeypatch.setattr(lowbit, "MIN_WEIGHTS", 0)
    lowbit._choose_shape.cache_clear()
    layer = _linear(512, 256, seed=2)
    stage_first, draft_first = lowbit.STAGE_WORK.preference, lowbit.DRAFT_WORK.preference
    try:
        work = lambda rows, pref: lowbit.Workload(rows, pref)  # noqa: E731
        assert lowbit.choose(layer, "auto", work(((1, 96), (64, 2)), stage_first)) == "int4"  # 128 vs 165: 1.29x
        assert lowbit.choose(layer, "auto", work(((1, 64), (64, 2)), stage_first)) == "int8"  # int4 faster, < GAIN
        assert lowbit.choose(layer, "auto", work(((1, 64), (64, 2)), draft_first)) == "int4"  # its preference
        assert lowbit.choose(layer, "auto", work(((64, 2),), draft_first)) == "int8"  # 11.4 vs 42: int8
        assert lowbit.choose(layer, "auto", lowbit.DRAFT_WORK) == "int4"
        assert lowbit.choose(layer, "auto", lowbit.STAGE_WORK) == "int8"
    finally:
        lowbit._choose_shape.cache_clear()


def test_apply_converts_casts_what_is_left_and_frees_the_originals():
    model = torch.nn.Sequential(torch.nn.Embedding(1000, 512), torch.nn.Linear(512, 1024), torch.nn.LayerNorm(1024),
                                torch.nn.Linear(1024, 32)).to(torch.bfloat16)
    original = weakref.ref(model[1].weight)
    counts = lowbit.apply(model, "int8", lowbit.STAGE_WORK, torch.float32)
    gc.collect()
    assert counts == {"int8 embedding": 1, "int8": 2} and original() is None
    assert isinstance(model[0], lowbit.Int8Embedding) and isinstance(model[1], lowbit.Int8Linear)
    assert model[2].weight.dtype == torch.float32  # the norm, cast to the compute dtype
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 3, 32) and out.dtype == torch.float32
    assert memory.formats_line(counts) == "int8 x2, int8 embedding x1"
    assert lowbit.load_dtype(torch.float32, "int8") is None and lowbit.load_dtype(torch.float32, "dense") is torch.float32


def test_bad_formats_are_refused_by_name():
    with pytest.raises(ValueError, match="weights must be one of auto, dense, int8, int4, got 'int3'"):
        lowbit.apply(torch.nn.Linear(4, 4), "int3", lowbit.STAGE_WORK)
    with pytest.raises(ValueError, match="draft_weights must be one of auto, dense, int8, int4, got 'fp8'"):
        SpecConfig(draft_weights="fp8")
    with pytest.raises(ValueError, match="weights must be one of"):
        SpecConfig(weights="none")


def test_workers_report_their_formats_and_memory():
    lines = memory.describe_workers([{"role": "stage0", "formats": {"int8": 3, "dense": 1}, "rss_bytes": 2.5e9,
                                      "peak_rss_bytes": 3e9, "pid": 7}])
    assert lines == ["stage0: int8 x3, dense x1; 2.50 GB resident (peak 3.00 GB); pid 7"]
    assert memory.resident_bytes() > 0 and memory.peak_resident_bytes() >= memory.resident_bytes() // 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=0.0, tree_width=2),
                                dict(temperature=1.0, seed=4)])
def test_speculation_over_low_bit_workers_equals_their_target_only_output(cache, weights, kw):
    """Greedy (chains and trees): token for token what target-only decoding with the same weights
    gives, with a noisy draft in another format; sampled: a seeded run repeats."""
    draft_weights = "int4" if weights == "int8" else "int8"
    cfg = SpecConfig(target="tiny", draft="tiny-draft:noise=0.05", dtype="float32", cache_dir=cache,
                     max_new_tokens=40, num_stages=2, weights=weights, draft_weights=draft_weights)
    with SpecMesh(cfg) as engine:
        assert {w["role"]: set(w["formats"]) for w in engine.backend.workers} == {
            "stage0": {weights, "int8 embedding"}, "stage1": {weights}, "draft": {draft_weights, "int8 embedding"}}
        out = engine.generate(PROMPT, **kw)
        assert out.stats.drafted > 0
        if kw["temperature"] == 0:
            assert out.output_ids == engine.generate(PROMPT, draft=None).output_ids
            assert out.stats.accepted < out.stats.drafted  # the noisy draft was wrong somewhere
        else:
            assert engine.generate(PROMPT, **kw).output_ids == out.output_ids


def test_a_low_bit_tiny_target_is_another_model_than_the_dense_one(cache):
    """The formats do change the target (so the equality above is not the dense model's)."""
    path = tiny.materialise("tiny", cache)
    ids = torch.tensor(PROMPT)
    logits = {}
    for fmt in ("dense", "int4"):
        stage = hf.load_stage(path, dtype=lowbit.load_dtype(torch.float32, fmt))
        lowbit.apply(stage.module, fmt, lowbit.STAGE_WORK, torch.float32)
        hidden = hf.forward(stage, stage.new_cache(), input_ids=ids, position_ids=torch.arange(len(PROMPT)))
        logits[fmt] = hf.lm_head(stage, hidden)
    assert float((logits["dense"] - logits["int4"]).abs().max()) > 1e-2


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_nothing_of_the_loaded_tensors_survives_conversion(fmt):
    """A converted layer keeps no loaded tensor, bias included: one loaded tensor alive keeps its
    whole weights file mapped, and the pages conversion read resident (a 1.5B stage: 3.0 GB, not 1.3)."""
    dtype = torch.float32 if fmt == "int8" else torch.bfloat16  # the bias's dtype in each format
    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(dtype)
    loaded = {t.untyped_storage().data_ptr() for t in (model[0].weight, model[0].bias)}
    lowbit.apply(model, fmt, lowbit.STAGE_WORK)
    kept = {t.untyped_storage().data_ptr() for t in [*model.buffers(), *model.parameters()]}
    assert not loaded & kept
