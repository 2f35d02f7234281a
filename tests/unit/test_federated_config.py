"""SpecFed's declarations and wire: the [federated] topology table, the SpecConfig fields, the
FederatedRows message through the codec, and the benchmark's --quick run."""
from __future__ import annotations

import io

import pytest
import torch

from specmesh.cluster.federated_plan import config_fields, worker_layouts
from specmesh.cluster.inproc import config_from_topology
from specmesh.policies import federated as fed
from specmesh.runtime import codec
from specmesh.runtime.config import SpecConfig
from specmesh.runtime.framing import ProtocolError
from specmesh.runtime.messages import FederatedRows

FILE = """
name = "two federated workers"
[models]
draft = "tiny-draft:seed=1"
target = "tiny"
[default_link]
latency_ms = 0
[federated]
top_k = 8
strategy = "spread-q"
[[federated.workers]]
target = "tiny:seed=1"
stages = ["edge1"]
weight = 3
[[federated.workers]]
target = "tiny:seed=2"
stages = ["edge2", "edge3"]
layers = [1, 3]
weight = 1
[[nodes]]
name = "device"
role = "device"
[[nodes]]
name = "edge1"
role = "edge"
[[nodes]]
name = "edge2"
role = "edge"
[[nodes]]
name = "edge3"
role = "edge"
[[links]]
a = "device"
b = "edge2"
latency_ms = 7
"""


def test_the_topology_table_becomes_config_fields_and_layouts(tmp_path):
    path = tmp_path / "fed.toml"
    path.write_text(FILE)
    config = config_from_topology(str(path), cache_dir=str(tmp_path))
    assert config.federated_workers == ("tiny:seed=1", "tiny:seed=2")
    assert config.federated_weights == (3.0, 1.0) and config.federated_k == 8
    assert config.federated_strategy == "spread-q"
    first, second = worker_layouts(config)
    assert first.stages == ("edge1",) and second.stages == ("edge2", "edge3")
    assert [len(r) for r in second.split_layers(4)] == [1, 3]
    assert second.models.target == "tiny:seed=2"
    assert second.link("device", "edge2").latency_ms == 7


@pytest.mark.parametrize("old,new,match", [
    ('weight = 3', 'weight = -3', r"federated.workers\[0\].weight = -3"),
    ('strategy = "spread-q"', 'strategy = "spread"', "strategy 'spread'"),
    ('stages = ["edge1"]', 'stages = []', r"federated.workers\[0\].stages = \[\]"),
    ('top_k = 8', 'top_k = 8\nwidth = 2', "federated.width = 2: unknown key"),
    ('stages = ["edge1"]', 'stages = ["edge9"]', r"federated.workers\[0\].stages\[0\] = 'edge9': no such node"),
])
def test_a_bad_table_is_refused_by_key_path(tmp_path, old, new, match):
    path = tmp_path / "fed.toml"
    path.write_text(FILE.replace(old, new))
    with pytest.raises(ValueError, match=match):
        worker_layouts(config_from_topology(str(path)))


def test_without_a_table_there_are_no_federated_fields():
    assert config_fields('[models]\ntarget = "tiny"\n', "tiny") == {}


@pytest.mark.parametrize("fields,match", [
    (dict(federated_workers=("a", "b"), federated_weights=(1.0,)), "need one weight per worker"),
    (dict(federated_workers=("a", "b"), federated_weights=(1.0, 0.0)), r"weights\[1\] = 0.0"),
    (dict(federated_weights=(1.0,)), "without federated_workers"),
    (dict(federated_workers=("a", ""),), r"federated_workers\[1\] = ''"),
    (dict(federated_workers="ab"), "tuple of model names"),
    (dict(federated_workers=("a",), federated_k=-2), "top_k"),
    (dict(federated_workers=("a",), federated_strategy="mean"), "strategy 'mean'"),
    (dict(federated_workers=("a",), acceptance="typical"), "acceptance 'exact'"),
])
def test_config_fields_are_validated_by_name(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SpecConfig(target="tiny", **fields)


def test_config_accepts_lists_and_keeps_tuples():
    config = SpecConfig(target="tiny", federated_workers=["a", "b"], federated_weights=[1, 2])
    assert config.federated_workers == ("a", "b") and config.federated_weights == (1, 2)


def _reply(k: int, vocab: int = 64) -> FederatedRows:
    p = torch.softmax(torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)) * 3, -1)
    rows, kept = fed.truncate(p, k)
    return FederatedRows("s", 2, rows, kept, [1.5])


@pytest.mark.parametrize("k", [1, 4, 0])
def test_the_reply_crosses_the_codec_exactly(k):
    msg = _reply(k)
    data = codec.encode(msg)
    back = codec.decode(data, vocab_size=64)
    assert isinstance(back, FederatedRows) and (back.session_id, back.round, back.stage_ms) == ("s", 2, [1.5])
    assert torch.equal(back.kept, msg.kept)
    assert torch.equal(back.rows.to_dense(), msg.rows.to_dense())  # float32 on the wire: bit for bit
    assert data[1] & 1 or (data[2], data[3]) == (0x96, 11)  # [tag 11, 5 fields], unless compressed


def test_more_entries_cost_more_bytes():
    sizes = [len(codec.encode(_reply(k, 256))) for k in (1, 4, 16, 64)]
    assert sizes == sorted(sizes) and sizes[0] < 80  # 3 rows of one (id, float32) entry plus a header


@pytest.mark.parametrize("kept,match", [
    (torch.tensor([0.5, 0.5]), "2 masses for 3 rows"),
    (torch.tensor([0.5, 0.0, 0.5]), r"masses must lie in \(0, 1\]"),
    (torch.tensor([0.5, 1.5, 0.5]), r"masses must lie in \(0, 1\]"),
    (torch.tensor([0.5, float("nan"), 0.5]), r"masses must lie in \(0, 1\]"),
])
def test_a_bad_kept_mass_is_refused(kept, match):
    msg = _reply(4)
    with pytest.raises(ProtocolError, match=match):
        codec.encode(FederatedRows(msg.session_id, msg.round, msg.rows, kept, msg.stage_ms))


def test_the_benchmark_runs_quick(tmp_path):
    from specmesh.benchmarks import federated as bench

    out = io.StringIO()
    rows = bench.run("tiny", quick=True, tokens=6, cache_dir=str(tmp_path), out=out)
    text = out.getvalue()
    assert "tiny random models" in text and "dense" in text
    assert len(rows) == 1 + len(fed.STRATEGIES) * len(bench.QUICK_KS)
    dense = rows[0]
    assert dense.k == 0 and dense.tv < 1e-5 and dense.bound < 1e-5
    for r in rows[1:]:
        assert r.tv <= r.bound + 1e-5 and r.acc_bias <= r.bound + 1e-5
        assert r.bytes_down < dense.bytes_down  # top-K replies are smaller than dense ones


def test_the_shipped_example_generates_over_every_worker_link(tmp_path):
    from specmesh.cluster.topology import example_path
    from specmesh.runtime import SpecMesh

    config = config_from_topology(str(example_path("federated_tiny")), cache_dir=str(tmp_path),
                                  dtype="float32", temperature=1.0, max_new_tokens=8)
    with SpecMesh(config) as engine:
        result = engine.generate([5, 17, 42])
        links = engine.backend.device_links
    assert len(result.output_ids) >= 1 and result.stats.bytes_down > 0
    assert links == ("worker1:device->edge1", "worker1:edge1->device",
                     "worker2:device->edge2", "worker2:edge3->device")
