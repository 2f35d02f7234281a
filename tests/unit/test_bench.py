"""``specmesh bench --quick`` on tiny models: valid JSON, a Markdown report, real PNGs, and ratios that
follow from the raw figures."""
from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console
from typer.testing import CliRunner

from specmesh.benchmarks import humaneval_eval, options, plots, report, suite
from specmesh.benchmarks.prompts import humaneval_problem
from specmesh.benchmarks.scenarios import SCENARIO_FUNCS
from specmesh.cluster.topology import load_topology, single_machine

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 10_000  # a plot with axes, lines and labels; an empty canvas is a few hundred bytes
PLOTTED = ("latency", "gamma", "sparsifier", "hf", "lengths")  # quality is skipped on tokenizer-less tiny models


def _no_nan(token):
    raise ValueError(f"results.json holds {token}: not valid JSON")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    cache = str(tmp_path_factory.mktemp("models"))
    suite.run_bench(options.BenchOptions(out=out, quick=True, cache_dir=cache), Console(file=io.StringIO()))
    data = json.loads((out / "results.json").read_text(), parse_constant=_no_nan)
    return out, data


def test_results_json_has_every_figure_and_its_context(bench):
    _, data = bench
    for key in ("schema", "created", "command", "options", "grid", "models", "seed", "machine", "versions",
                "threads", "repeats", "elapsed_s", "scenarios"):
        assert key in data, key
    assert {"platform", "cpu_count", "loadavg_start", "loadavg_end"} <= set(data["machine"])
    assert {"torch", "transformers", "ray", "specmesh"} <= set(data["versions"])
    assert data["command"].startswith("specmesh bench") and "--quick" in data["command"]
    assert list(data["scenarios"]) == list(options.SCENARIOS)  # every scenario, in the documented order
    sections = data["scenarios"]
    for name, section in sections.items():  # a scenario takes at least as long as the runs it timed
        timed = sum(r["wall_s"] for p in section.get("points", [section]) for r in p.get("runs", []))
        assert section["elapsed_s"] >= timed, name
        # tiny models have no tokenizer (quality) nor a GGUF (llamacpp): those two are skipped
        assert (timed > 0) == (name not in ("quality", "llamacpp")), name
    assert "use --models bundled" in sections["llamacpp"]["skipped"]
    assert data["elapsed_s"] >= sum(s["elapsed_s"] for s in sections.values())
    grid = options.GRIDS[("tiny", True)]
    points = data["scenarios"]["latency"]["points"]
    assert [(p["num_stages"], p["latency_ms"]) for p in points] == [
        (n, lat) for n in grid.stage_counts for lat in grid.latencies_ms]
    models = data["models"]
    for p in points:  # the file each engine was built from is exactly the layout the point claims
        assert load_topology(p["topology_file"]) == single_machine(
            p["num_stages"], p["latency_ms"], math.inf, models["draft"], models["target"])
        assert p["links"] == load_topology(p["topology_file"]).describe_links()
        assert p["config"]["seed"] == data["seed"] and p["config"]["topology"] == p["topology_file"]


def test_raw_runs_are_consistent(bench):
    _, data = bench
    sections = [*data["scenarios"]["latency"]["points"], data["scenarios"]["gamma"],
                data["scenarios"]["sparsifier"], *data["scenarios"]["lengths"]["points"]]
    for section in sections:
        labels = [v["label"] for v in section["variants"]]
        runs = section["runs"]
        assert len(runs) == section["repeats"] * len(labels) * len({r["prompt_id"] for r in runs})
    hf_runs = [r for r in data["scenarios"]["hf"]["runs"] if "rounds" in r]  # SpecMesh's, not the peer's
    assert {r["variant"] for r in hf_runs} == {"target-only", "specmesh"}
    for section in [*sections, {"runs": hf_runs}]:
        for r in section["runs"]:
            assert r["tokens"] == len(r["output_ids"]) > 0
            assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["wall_s"], rel=1e-12)
            # a round commits its accepted tokens plus one (fewer only where the generation stops)
            assert r["rounds"] <= r["tokens"] <= r["accepted"] + r["rounds"]
            if r["variant"] == "target-only":
                assert r["drafted"] == 0 and r["rounds"] == r["tokens"]
            else:
                assert r["drafted"] > 0 and r["acceptance_rate"] == pytest.approx(r["accepted"] / r["drafted"])


def _recompute(runs: list[dict], variant: str, repeat: int) -> dict:
    sel = [r for r in runs if r["variant"] == variant and r["repeat"] == repeat]
    tokens = sum(r["tokens"] for r in sel)
    rounds = sum(r["rounds"] for r in sel)
    return {"tokens_per_s": tokens / sum(r["wall_s"] for r in sel),
            "mean_accepted_length": (sum(r["accepted"] for r in sel) + rounds) / rounds,
            "bytes_up_per_token": sum(r["bytes_up"] for r in sel) / tokens}


def _check_spread(stat: dict, values: list[float]) -> None:
    assert stat["values"] == pytest.approx(values, rel=1e-9)
    assert stat["mean"] == pytest.approx(sum(values) / len(values), rel=1e-9)
    assert stat["min"] == pytest.approx(min(values)) and stat["max"] == pytest.approx(max(values))


def test_ratios_follow_from_raw_figures(bench):
    _, data = bench
    sc = data["scenarios"]
    for section in [*sc["latency"]["points"], sc["gamma"], sc["sparsifier"]]:
        base = section["baseline"]
        for v in section["variants"]:
            label = v["label"]
            mine = [_recompute(section["runs"], label, r) for r in range(section["repeats"])]
            theirs = [_recompute(section["runs"], base, r) for r in range(section["repeats"])]
            summary = section["summary"][label]
            _check_spread(summary["speedup"],
                          [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(mine, theirs)])
            for field in ("tokens_per_s", "mean_accepted_length", "bytes_up_per_token"):
                _check_spread(summary[field], [m[field] for m in mine])
    spars = sc["sparsifier"]
    for label, summary in spars["summary"].items():
        if label == "target-only":
            continue
        dense = [_recompute(spars["runs"], "dense", r) for r in range(spars["repeats"])]
        mine = [_recompute(spars["runs"], label, r) for r in range(spars["repeats"])]
        _check_spread(summary["uplink_saving_vs_dense"],
                      [d["bytes_up_per_token"] / m["bytes_up_per_token"] for d, m in zip(dense, mine)])
    hf = sc["hf"]
    for r in range(hf["repeats"]):
        a, b = (_recompute(hf["runs"], v, r)["tokens_per_s"] if v in ("specmesh", "target-only") else
                sum(x["tokens"] for x in hf["runs"] if x["variant"] == v and x["repeat"] == r)
                / sum(x["wall_s"] for x in hf["runs"] if x["variant"] == v and x["repeat"] == r)
                for v in ("specmesh", "hf-assisted"))
        assert hf["summary"]["all"]["specmesh / hf-assisted"]["values"][r] == pytest.approx(a / b, rel=1e-9)


def test_every_specmesh_section_shows_the_round_profile(bench):
    out, data = bench
    text = (out / "report.md").read_text()
    for name in ("latency", "gamma", "sparsifier", "hf", "lengths"):
        body = next(b for b in text.split("\n## ")[1:] if b.startswith(name + ":"))
        assert "| variant | rounds | round | draft | stages | links | codec | rest | limit |" in body, name
    point = data["scenarios"]["latency"]["points"][-1]  # the last point: most stages, most latency
    runs = [r for r in point["runs"] if r["variant"] == "specmesh"]
    wall = sum(r["profile_ms"]["wall"] for r in runs)
    rounds = sum(r["rounds"] for r in runs)
    limit = sum(r["profile_ms"]["limit"] for r in runs)
    row = (f"| {point['num_stages']} st, {point['latency_ms']:g} ms: specmesh | {rounds} | {wall / rounds:.1f} |")
    assert row in text and f"| {limit / rounds:.1f} | {limit / wall:.2f} |" in text
    for r in runs:  # the parts of a round add up to its time; the links are the modelled delay
        p = r["profile_ms"]
        assert p["draft"] + p["stages"] + p["links"] + p["codec"] + p["rest"] == pytest.approx(p["wall"])
        assert p["links"] > 0


def test_tiny_fp32_outputs_are_lossless(bench):
    _, data = bench
    sc = data["scenarios"]
    for p in sc["latency"]["points"]:
        assert p["summary"]["specmesh"]["same_output_as_baseline"]
    assert all(s["same_output_as_baseline"] for s in sc["gamma"]["summary"].values())
    for p in sc["lengths"]["points"]:  # greedy: every draft length writes the same text
        outs = {}
        for r in p["runs"]:
            outs.setdefault((r["prompt_id"], r["repeat"]), set()).add(tuple(r["output_ids"]))
        assert all(len(o) == 1 for o in outs.values())
    for entry in sc["hf"]["identity"]:
        assert entry["specmesh vs target-only"]["identical"]
        assert entry["target-only vs hf-greedy"]["identical"], "target-only must equal transformers greedy"


def test_markdown_mentions_every_scenario(bench):
    out, data = bench
    text = (out / "report.md").read_text()
    assert f"`{data['command']}`" in text
    headings = [line.split(":")[0].removeprefix("## ") for line in text.splitlines() if line.startswith("## ")]
    assert headings == list(options.SCENARIOS)
    assert "Skipped:" in text and "Harness self-check" in text  # quality on tokenizer-less tiny models
    for name in PLOTTED:
        assert f"![{name}]({name}.png)" in text
    assert f"total run time {report._seconds(data['elapsed_s'])}" in text
    speedup = data["scenarios"]["latency"]["points"][0]["summary"]["specmesh"]["speedup"]
    assert report.fmt(speedup, ".2f", "x") in text  # the latency table shows the measured speedup


@pytest.mark.parametrize("name", PLOTTED)
def test_plots_are_real_pngs(bench, name):
    out, _ = bench
    blob = (out / f"{name}.png").read_bytes()
    assert blob.startswith(PNG_MAGIC) and len(blob) > MIN_PNG_BYTES


def test_report_rebuilds_from_results_alone(bench, tmp_path):
    out, data = bench
    paths = report.write(data, tmp_path)
    assert (tmp_path / "report.md").read_text() == (out / "report.md").read_text()
    assert {p.name for p in paths} >= {"results.json", "report.md", *(f"{n}.png" for n in PLOTTED)}


def test_humaneval_harness_runs_in_a_subprocess_with_a_timeout(bench):
    _, data = bench
    assert all(row["ok"] for row in data["scenarios"]["quality"]["self_check"])
    problem = humaneval_problem(0)
    assert humaneval_eval.check(problem, "    while True:\n        pass\n", timeout_s=1.0).result == "timed out"
    assert humaneval_eval.truncate("    return 1\n\ndef other():\n    pass\n") == "    return 1\n"
    assert humaneval_eval.pass_at_1([humaneval_eval.CheckResult("a", True, "passed"),
                                     humaneval_eval.CheckResult("b", False, "failed")]) == 0.5


def test_every_scenario_has_a_function_and_a_report_section():
    assert list(SCENARIO_FUNCS) == list(options.SCENARIOS)
    assert list(report.SECTIONS) == list(options.SCENARIOS)


@pytest.mark.parametrize("kw, word", [({"scenarios": ("nope",)}, "scenario"), ({"models": "huge"}, "models"),
                                      ({"repeats": 0}, "repeats"), ({"temperature": -1.0}, "temperature"),
                                      ({"dtype": "int8"}, "dtype")])
def test_options_name_the_bad_value(kw, word):
    with pytest.raises(ValueError, match=word):
        options.BenchOptions(**kw)


def test_cli_bench_help_teaches_and_rejects_bad_input():
    from specmesh.cluster.cli import app

    runner = CliRunner()
    helped = runner.invoke(app, ["bench", "--help"])
    assert helped.exit_code == 0
    for name in options.SCENARIOS:
        assert name in helped.output
    bad = runner.invoke(app, ["bench", "--scenario", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output  # a usage error naming the value


def test_a_run_cut_short_keeps_its_finished_measurements(tmp_path, monkeypatch):
    def interrupted(b):
        b.checkpoint("gamma: first point", {"runs": [{"tokens": 3, "wall_s": 0.5}]})
        raise KeyboardInterrupt

    monkeypatch.setitem(suite.SCENARIO_FUNCS, "gamma", interrupted)
    with pytest.raises(KeyboardInterrupt):
        suite.run_bench(options.BenchOptions(out=tmp_path, scenarios=("gamma",)), Console(file=io.StringIO()))
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["in_progress"] == [{"label": "gamma: first point", "runs": [{"tokens": 3, "wall_s": 0.5}]}]


def test_error_bars_tolerate_a_mean_rounded_past_its_range(tmp_path):
    st = {"mean": 1.0000000000000002, "min": 1.0, "max": 1.0, "values": [1.0, 1.0, 1.0]}
    section = {"points": [{"num_stages": 1, "latency_ms": 0, "summary": {"specmesh": {"speedup": st}}}]}
    assert plots.plot_latency(section, tmp_path / "latency.png").read_bytes().startswith(PNG_MAGIC)
