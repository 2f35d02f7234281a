"""Split verification end to end (SpecMesh API, in-process backend, tiny fp32 models, noisy draft),
and how it is chosen: SpecConfig, the CLI option, a topology's [policies] table."""
from __future__ import annotations

import pytest
import torch

from specmesh.cluster.cli_options import make_config
from specmesh.cluster.inproc import config_from_topology
from specmesh.runtime import SpecConfig, SpecMesh

torch.set_num_threads(1)
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 128, 64]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = SpecConfig(target="tiny", draft="tiny-draft", dtype="float32", num_stages=2, max_new_tokens=40,
                     cache_dir=str(tmp_path_factory.mktemp("models")))
    with SpecMesh(cfg) as built:
        yield built


def test_greedy_split_equals_target_only(engine):
    want = engine.generate(PROMPT, draft=None).output_ids
    got = engine.generate(PROMPT, verification="split")
    assert got.output_ids == want
    assert got.stats.acceptance_rate < 0.9  # the noisy draft is rejected: corrections were drawn


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=8),
                                dict(temperature=0.9, sparsifier="dense"), dict(temperature=0.8, top_p=0.9)],
                         ids=["t1", "t0.7-topk8", "dense", "top-p"])
def test_sampled_split_equals_target_side_seed_for_seed(engine, kw):
    for seed in (0, 1, 2):
        want = engine.generate(PROMPT, seed=seed, **kw)
        got = engine.generate(PROMPT, seed=seed, verification="split", **kw)
        assert got.output_ids == want.output_ids, seed
        assert got.stats.bytes_up < want.stats.bytes_up  # q(x) per candidate instead of q rows


def test_overlap_and_streaming_in_split(engine):
    want = engine.generate(PROMPT, temperature=1.0, seed=4).output_ids
    streamed = [t for chunk in engine.stream(PROMPT, temperature=1.0, seed=4, verification="split", overlap=True)
                for t in chunk.token_ids]
    assert streamed == want


def test_split_with_a_lossy_rule_matches_target_side(engine):
    kw = dict(temperature=1.0, seed=5, acceptance="typical")
    assert engine.generate(PROMPT, verification="split", **kw).output_ids == engine.generate(PROMPT, **kw).output_ids


def test_the_config_names_a_bad_placement():
    with pytest.raises(ValueError, match="'edge'"):
        SpecConfig(verification="edge")
    with pytest.raises(ValueError, match="chains only"):
        SpecConfig(verification="split", tree_width=2)
    assert SpecConfig(verification="split").policy_map()["verification"] == "split"
    with pytest.raises(ValueError, match="SpecConfig field verification"):
        SpecConfig(policy_options={"verification": "split"})


def test_the_cli_option_and_the_topology_set_it(tmp_path):
    import typer

    assert make_config(None, "tiny", None, True, verification="split").verification == "split"
    with pytest.raises(typer.BadParameter, match="'nope'"):
        make_config(None, "tiny", None, True, verification="nope")
    path = tmp_path / "t.toml"
    path.write_text('stages = ["edge1"]\n[models]\ntarget = "tiny"\n[policies]\nverification = "split"\n'
                    '[[nodes]]\nname = "device"\nrole = "device"\n[[nodes]]\nname = "edge1"\nrole = "edge"\n')
    assert config_from_topology(str(path)).verification == "split"
    assert config_from_topology(str(path), verification="target").verification == "target"
