"""Where a round's time goes: the profile adds up, and the link delay it reports is the model's."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from specmesh.cluster.cli import app
from specmesh.cluster.links import LinkSpec
from specmesh.cluster.report import profile_rows
from specmesh.cluster.compare import Run
from specmesh.runtime import SpecMesh
from specmesh.runtime.api import GenerationResult
from specmesh.runtime.stats import RoundRecord, SessionStats
from specmesh.runtime.traffic import DOWNLINK, UPLINK

torch.set_num_threads(1)
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7]
LATENCY_MS, MBPS = 3.0, 50.0


def test_profile_parts_add_up_and_the_link_delay_is_the_model(tmp_path):
    path = tmp_path / "links.toml"
    path.write_text(f"""
        stages = ["edge1", "edge2"]
        [models]
        target = "tiny"
        draft = "tiny-draft"
        [default_link]
        latency_ms = {LATENCY_MS}
        bandwidth_mbps = {MBPS}
    """ + "".join(f'[[nodes]]\nname = "{n}"\nrole = "{n.rstrip("12")}"\n' for n in ("device", "edge1", "edge2")))
    from specmesh.cluster.inproc import config_from_topology

    cfg = config_from_topology(str(path), dtype="float32", cache_dir=str(tmp_path / "m"), max_new_tokens=16)
    with SpecMesh(cfg) as engine:
        before = engine.backend.traffic.snapshot()
        result = engine.generate(PROMPT)
        after = engine.backend.traffic.snapshot()
    link = LinkSpec(LATENCY_MS, MBPS)
    modelled_ms = 0.0
    for key, t in after.counts.items():
        b = before.counts.get(key)
        nbytes, msgs = t.bytes - (b.bytes if b else 0), t.messages - (b.messages if b else 0)
        modelled_ms += (msgs * link.delay_s(0) + (link.delay_s(nbytes) - link.delay_s(0))) * 1e3
    s = result.stats
    assert s.link_delay_ms == pytest.approx(modelled_ms, rel=1e-9)  # neither more nor less delay
    p = s.profile()
    assert p["wall"] == pytest.approx(sum(r.wall_ms for r in s.records))
    assert p["draft"] + p["stages"] + p["links"] + p["codec"] + p["rest"] == pytest.approx(p["wall"])
    assert p["draft"] > 0 and p["stages"] > 0 and p["codec"] > 0
    assert p["limit"] == pytest.approx(p["draft"] + p["stages"] + p["links"])
    assert 0 < p["efficiency"] <= 1
    assert {k for k, _ in after.counts} >= {"device->edge1", "edge2->device"}
    assert all(d in (UPLINK, DOWNLINK) for _, d in after.counts)


def test_profile_rows_are_per_round_means_of_the_runs():
    def run(wall: float, draft: float, stage: float, link: float, codec: float) -> Run:
        stats = SessionStats(rounds=2, link_delay_ms=link, codec_ms=codec,
                             records=[RoundRecord(1, 3, 1, 2, wall / 2, (stage / 2,), draft / 2)] * 2)
        return Run("p", "specmesh", GenerationResult([1], [2], None, "length", stats))

    rows = profile_rows([run(100, 40, 30, 10, 5), run(300, 60, 90, 30, 15)])
    # 4 rounds; per round: wall 100, draft 25, stages 30, links 10, codec 5, rest 30, limit 65
    assert rows == [["specmesh", "4", "100.0", "25.0", "30.0", "10.0", "5.0", "30.0", "65.0", "0.65", "-"]]


def test_run_profile_prints_the_breakdown(tmp_path):
    result = CliRunner().invoke(app, [
        "run", "--target", "tiny", "--draft", "tiny-draft", "--prompt-ids", "5,17,42", "--max-new-tokens", "6",
        "--dtype", "float32", "--stages", "1", "--cache-dir", str(tmp_path), "--profile"])
    assert result.exit_code == 0, result.output
    assert "where a round's time goes" in result.output and "limit" in result.output
