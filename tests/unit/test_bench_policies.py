"""The policy scenarios of ``specmesh bench``: ``quality`` (acceptance policies, pass@1 beside speed,
the default importance strength) and ``lengths`` (draft-length policies against the best static
gamma), end to end on tiny models, and their decision rules on hand-made results.

The tiny models have no tokenizer, so ``quality`` runs here on a copy of the tiny pair given a
byte-level tokenizer (token id = byte value): the code the random models write fails its tests, which
is all the harness needs to show.
"""
from __future__ import annotations

import dataclasses
import io
import json
import shutil

import pytest
from rich.console import Console
from typer.testing import CliRunner

from specmesh.actors.models import resolve
from specmesh.benchmarks import lengths, options, quality, report, suite
from specmesh.benchmarks.profile import profile_rows
from specmesh.benchmarks.runner import run_record, stat
from specmesh.benchmarks.prompts import humaneval
from specmesh.cluster import report as cluster_report
from specmesh.cluster.compare import Run
from specmesh.runtime.api import GenerationResult
from specmesh.runtime.stats import RoundRecord, SessionStats

TEXT = "tiny-text"
PROBLEMS = (53, 23)  # the shortest HumanEval prompts (115 and 133 bytes): they fit the tiny context
STRENGTHS = (0.25, 1.0)


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-in of every byte, so that token id == byte value
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    core = Tokenizer(models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core)


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """The tiny pair, copied, each with the same byte-level tokenizer; a model set and grid for it."""
    cache, root = tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("text-pair")
    tok = _byte_tokenizer()
    dirs = []
    for name in (options.MODELS["tiny"].target, options.MODELS["tiny"].draft):
        dst = root / name.replace(":", "_")
        shutil.copytree(resolve(name, str(cache)), dst)
        tok.save_pretrained(str(dst))
        dirs.append(str(dst))
    assert tok.decode(tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    grid = dataclasses.replace(options.GRIDS[("tiny", True)], lengths_latencies_ms=(0.0, 5.0),
                               prompts={"quality": 2, "lengths": 1})
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(options.MODELS, TEXT, options.ModelSet(dirs[0], dirs[1], "float32", 1))
        mp.setitem(options.GRIDS, (TEXT, True), grid)
        yield str(cache)


def _bench(out, cache, **kw) -> dict:
    suite.run_bench(options.BenchOptions(out=out, models=TEXT, quick=True, cache_dir=cache, problems=PROBLEMS,
                                         **kw), Console(file=io.StringIO()))
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def policy_bench(text_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("policy-bench")
    data = _bench(out, text_models, scenarios=("quality", "lengths"), temperature=0.7,
                  policies=("exact", "importance", "typical", "fly"), strengths=STRENGTHS)
    return out, data


def test_quality_runs_the_chosen_variants_sampled_with_a_seed_per_problem(policy_bench):
    _, data = policy_bench
    q = data["scenarios"]["quality"]
    labels = [v["label"] for v in q["variants"]]
    assert labels == ["target-only", "specmesh exact", "specmesh importance 0.25", "specmesh importance 1",
                      "specmesh typical", "specmesh fly"]
    assert q["temperature"] == 0.7 and all(v["overrides"]["temperature"] == 0.7 for v in q["variants"])
    assert q["strengths"] == {"specmesh importance 0.25": 0.25, "specmesh importance 1": 1.0}
    assert q["variants"][3]["overrides"]["policy_options"] == {"importance_strength": 1.0}
    assert q["lossy"] == {"target-only": False, "specmesh exact": False, "specmesh importance 0.25": True,
                          "specmesh importance 1": True, "specmesh typical": True, "specmesh fly": True}
    assert q["problems"] == [f"HumanEval/{i}" for i in PROBLEMS]
    for r in q["runs"]:  # every variant of a problem draws from that problem's own seed
        assert r["seed"] == options.problem_seed(0, PROBLEMS[q["problems"].index(r["prompt_id"])], r["repeat"])
        assert r["result"] and isinstance(r["passed"], bool)
    assert len({r["seed"] for r in q["runs"]}) == len(PROBLEMS)
    for label in labels:  # what the report's columns read
        x = q["summary"][label]
        assert {"tokens_per_s", "acceptance_rate", "mean_accepted_length", "speedup", "vs_exact"} <= set(x)
        mine = [r for r in q["runs"] if r["variant"] == label]
        assert q["passed"][label] == sum(r["passed"] for r in mine)
        assert q["pass_at_1"][label] == pytest.approx(q["passed"][label] / len(mine))
    exact = q["summary"]["specmesh exact"]["tokens_per_s"]["values"]
    for label in labels:
        assert q["summary"][label]["vs_exact"]["values"] == pytest.approx(
            [a / e for a, e in zip(q["summary"][label]["tokens_per_s"]["values"], exact)])
    assert q["default_strength"] == quality.default_strength(q)  # recomputable from the file alone
    assert q["default_strength"]["chosen"] in q["strengths"]
    assert [p["peer"] for p in q["peers"]] == ["specmesh typical", "specmesh fly"]


def test_a_sampled_quality_run_repeats(policy_bench, text_models, tmp_path):
    _, data = policy_bench
    again = _bench(tmp_path, text_models, scenarios=("quality",), temperature=0.7, policies=("exact",),
                   baseline=False)["scenarios"]["quality"]
    assert [v["label"] for v in again["variants"]] == ["specmesh exact"]  # --no-baseline, --policies exact
    first = {r["prompt_id"]: r["output_ids"] for r in data["scenarios"]["quality"]["runs"]
             if r["variant"] == "specmesh exact"}
    assert {r["prompt_id"]: r["output_ids"] for r in again["runs"]} == first
    assert again["summary"]["specmesh exact"]["speedup"]["mean"] is None  # no target-only: no speedup
    assert again["default_strength"]["chosen"] is None
    assert again["gamma"] == 4 == data["scenarios"]["quality"]["gamma"]  # the engine's


def test_quality_runs_every_variant_at_the_one_gamma_given(text_models, tmp_path):
    q = _bench(tmp_path, text_models, scenarios=("quality",), temperature=0.7, policies=("exact", "importance"),
               baseline=False, gammas=(6,))["scenarios"]["quality"]
    assert q["gamma"] == 6 and all(v["overrides"]["gamma"] == 6 for v in q["variants"])
    assert max(len(r["output_ids"]) for r in q["runs"]) > 0
    assert quality.quality_gamma(options.BenchOptions()) is None
    with pytest.raises(ValueError, match="one gamma"):
        quality.quality_gamma(options.BenchOptions(gammas=(4, 8)))


def test_lengths_runs_every_policy_at_every_latency(policy_bench):
    _, data = policy_bench
    s = data["scenarios"]["lengths"]
    assert [p["latency_ms"] for p in s["points"]] == [0.0, 5.0]
    assert s["gammas"] == [1, 2, 4] and s["adaptive"] == list(options.ADAPTIVE_LENGTHS)
    assert s["start_gamma"] == options.GRIDS[(TEXT, True)].lengths_start_gamma == 4
    for p in s["points"]:
        assert f"device->edge1 {p['latency_ms']:g}ms/inf" in p["links"]
        # adaptive: no gamma given, so the engine starts the first session at its gamma (4) and resumes
        assert all("gamma" not in v["overrides"] for v in p["variants"] if not v["label"].startswith("fixed"))
        labels = [v["label"] for v in p["variants"]]
        assert labels == ["fixed gamma=1", "fixed gamma=2", "fixed gamma=4", *options.ADAPTIVE_LENGTHS]
        assert {r["prompt_id"] for r in p["runs"]} == {s["prompts"][0]}  # the same prompt for all
        best = p["best_static"]
        static = [lab for lab in labels if lab.startswith("fixed")]
        assert best["label"] == max(static, key=lambda lab: p["summary"][lab]["tokens_per_s"]["mean"])
        for lab in labels:
            x = p["summary"][lab]
            assert x["vs_best_static"]["values"] == pytest.approx(
                [a / c for a, c in zip(x["tokens_per_s"]["values"],
                                       p["summary"][best["label"]]["tokens_per_s"]["values"])])
            mine = [r for r in p["runs"] if r["variant"] == lab and r["repeat"] == 0]
            assert x["mean_gamma"]["values"][0] == pytest.approx(
                sum(r["drafted"] for r in mine) / sum(r["rounds"] for r in mine))
        fixed2 = [r for r in p["runs"] if r["variant"] == "fixed gamma=2"]
        assert all(r["drafted"] <= 2 * r["rounds"] for r in fixed2)
    delays = [sum(r["profile_ms"]["links"] for r in p["runs"]) for p in s["points"]]
    assert delays[0] == 0 and delays[1] > 0  # the 5 ms point went through the link model


def test_report_sets_quality_and_speed_side_by_side_with_the_profile(policy_bench):
    out, data = policy_bench
    text = (out / "report.md").read_text()
    q = data["scenarios"]["quality"]
    assert "| variant | lossy | pass@1 | passed | acceptance | mean acc. len | tok/s | vs exact |" in text
    assert "**Lossy** policies" in text and "Default importance strength" in text
    assert f"Chosen: **{q['default_strength']['strength']:g}**" in text
    assert "| latency per hop | best static gamma | its tok/s | heuristic | confidence | tkslt | online |" in text
    assert text.count("Where a SpecMesh round's time goes") == 2  # quality and lengths
    profiled = _profile_labels(text)
    assert {"5 ms: online", "0 ms: fixed gamma=1", "specmesh importance 1", "specmesh exact"} <= set(profiled)
    assert "target-only" not in profiled  # the profile table lists SpecMesh variants only
    for name in ("quality", "lengths"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert report.write(data, out / "again")  # rebuilds from the results file alone


def _profile_labels(text: str) -> list[str]:
    """The first cells of every profile table's rows in a report."""
    labels, inside = [], False
    for line in text.splitlines():
        if line.startswith("| variant | rounds | round | draft |"):
            inside = True
        elif inside and line.startswith("| ") and not line.startswith("|---"):
            labels.append(line.split(" | ")[0].removeprefix("| "))
        elif not line.startswith("|"):
            inside = False
    return labels


def _section(pass_at_1: dict, tps: dict, strengths: dict, n: int = 20) -> dict:
    return {"problems": [f"HumanEval/{i}" for i in range(n)], "pass_at_1": pass_at_1, "strengths": strengths,
            "summary": {k: {"tokens_per_s": {"mean": v}} for k, v in tps.items()}}


IMP = {f"specmesh importance {s:g}": s for s in (0.25, 0.5, 1.0)}


def test_default_strength_is_the_fastest_within_one_problem_of_exact():
    s = _section({"specmesh exact": 0.85, "specmesh importance 0.25": 0.85, "specmesh importance 0.5": 0.80,
                  "specmesh importance 1": 0.75},
                 {"specmesh exact": 10.0, "specmesh importance 0.25": 10.5, "specmesh importance 0.5": 11.8,
                  "specmesh importance 1": 13.0}, IMP)
    d = quality.default_strength(s)
    assert (d["chosen"], d["strength"]) == ("specmesh importance 0.5", 0.5)  # 1.0 is two problems below
    assert d["vs_exact"] == pytest.approx(1.18) and d["goal_met"] is True
    assert [c["qualifies"] for c in d["candidates"]] == [True, True, False]
    assert [c["problems_below_exact"] for c in d["candidates"]] == pytest.approx([0, 1, 2])
    s["summary"]["specmesh importance 0.5"]["tokens_per_s"]["mean"] = 10.5  # a tie: the smaller strength
    d = quality.default_strength(s)
    assert d["strength"] == 0.25 and d["goal_met"] is False


def test_default_strength_says_why_it_chose_none():
    tps = {"specmesh exact": 10.0, **{k: 12.0 for k in IMP}}
    worse = quality.default_strength(_section({"specmesh exact": 0.9, **{k: 0.8 for k in IMP}}, tps, IMP))
    assert worse["chosen"] is None and "within 1 problem" in worse["reason"]
    no_exact = quality.default_strength(_section({k: 0.8 for k in IMP}, tps, IMP))
    assert no_exact["chosen"] is None and "exact" in no_exact["reason"]
    one = {"specmesh importance 0.5": 0.5}
    single = quality.default_strength(_section({"specmesh exact": 0.9, "specmesh importance 0.5": 0.9}, tps, one))
    assert single["chosen"] is None and "two" in single["reason"]
    # 10 problems, 3 samples each: pass@1 0.70 vs 0.63 is 0.7 of a problem below: within the bar
    sampled = quality.default_strength(_section(
        {"specmesh exact": 0.70, "specmesh importance 0.25": 0.5, "specmesh importance 0.5": 0.63,
         "specmesh importance 1": 0.4}, tps, IMP, n=10))
    assert sampled["chosen"] == "specmesh importance 0.5"


def test_peers_are_compared_with_the_fastest_importance_variant_at_equal_or_better_pass():
    s = _section({"specmesh typical": 0.75, "specmesh fly": 0.85, "specmesh importance 0.25": 0.85,
                  "specmesh importance 0.5": 0.80, "specmesh importance 1": 0.70},
                 {"specmesh typical": 12.0, "specmesh fly": 11.0, "specmesh importance 0.25": 10.5,
                  "specmesh importance 0.5": 11.8, "specmesh importance 1": 13.0}, IMP)
    typical, fly = quality.peer_comparison(s)
    assert typical["importance"] == "specmesh importance 0.5" and typical["ratio"] == pytest.approx(11.8 / 12)
    assert typical["beats"] is False
    assert fly["importance"] == "specmesh importance 0.25" and fly["ratio"] == pytest.approx(10.5 / 11)


def _point(tps: dict[str, list[float]]) -> dict:
    variants = [{"label": k, "overrides": {"draft_length": "fixed", "gamma": int(k.split("=")[1])}
                 if k.startswith("fixed") else {"draft_length": k, "gamma": 4}} for k in tps]
    return {"variants": variants, "summary": {k: {"tokens_per_s": stat(v)} for k, v in tps.items()}}


def test_best_static_gamma_and_the_ratios_to_it():
    p = _point({"fixed gamma=2": [8.0, 9.0], "fixed gamma=4": [10.0, 9.6], "fixed gamma=8": [9.0, 9.9],
                "online": [9.7, 9.5], "tkslt": [8.0, 9.0]})
    best = lengths.compare_to_best_static(p)
    assert best == {"label": "fixed gamma=4", "gamma": 4, "tokens_per_s": pytest.approx(9.8)}
    s = p["summary"]
    assert s["online"]["vs_best_static"]["values"] == pytest.approx([0.97, 9.5 / 9.6])
    assert s["online"]["within_goal"] is True and s["tkslt"]["within_goal"] is False
    assert s["fixed gamma=8"]["vs_best_static"]["values"] == pytest.approx([0.9, 9.9 / 9.6])  # per repeat
    assert s["fixed gamma=4"]["vs_best_static"]["mean"] == pytest.approx(1.0)
    assert lengths.compare_to_best_static(_point({"online": [1.0]})) is None


def test_mean_gamma_is_drafted_per_round():
    m = {"repeats": 1, "variants": [{"label": "online"}], "summary": {"online": {}},
         "runs": [{"variant": "online", "repeat": 0, "rounds": 4, "drafted": 10},
                  {"variant": "online", "repeat": 0, "rounds": 6, "drafted": 20}]}
    lengths.add_mean_gamma(m)
    assert m["summary"]["online"]["mean_gamma"]["values"] == [3.0]


def _run(variant: str, drafted: int, proposals: int, hits: int) -> Run:
    stats = SessionStats(prompt_tokens=3, rounds=2, drafted=drafted, generated_tokens=4, wall_s=0.05,
                         link_delay_ms=6.0, codec_ms=1.5, draft_counters={"proposals": proposals,
                                                                          "proposals_hit": hits})
    stats.records = [RoundRecord(1, 2, 1, 2, 30.0, (8.0, 5.0), 4.0), RoundRecord(2, 2, 1, 2, 20.0, (6.0,), 2.5)]
    return Run("p", variant, GenerationResult([1, 2, 3], [4, 5, 6, 7], None, "length", stats))


def test_bench_profile_rows_match_specmesh_run_profile():
    runs = [_run("specmesh", 4, 2, 1), _run("specmesh", 4, 2, 0), _run("other", 4, 0, 0)]
    rows = [run_record(r, 0, None) for r in runs]
    assert json.loads(json.dumps(rows))  # what the results file stores
    assert profile_rows(rows) == cluster_report.profile_rows(runs)
    target_only = run_record(_run("target-only", 0, 0, 0), 0, None)
    assert [r[0] for r in profile_rows([target_only, *rows], "x: ")] == ["x: specmesh", "x: other"]


@pytest.mark.parametrize("args, word", [(["--policies", "exact,nope"], "nope"), (["--strengths", "0.5,2"], "2"),
                                        (["--gammas", "1,x"], "--gammas"), (["--adaptive", "fixed"], "fixed"),
                                        (["--latencies", "-5"], "latencies"),
                                        (["--policies", "exact", "--strengths", "0.5"], "importance")])
def test_cli_rejects_bad_policy_options_by_name(args, word):
    from specmesh.cluster.cli import app

    got = CliRunner().invoke(app, ["bench", *args])
    assert got.exit_code == 2 and word in got.output


def test_temperature_reaches_the_sampled_scenarios_only_and_the_command_line_reproduces():
    o = options.BenchOptions(temperature=0.7, policies=("exact", "importance"), strengths=(0.25, 1.0),
                             baseline=False, latencies_ms=(0.0, 50.0), gammas=(1, 4), adaptive=("online",))
    assert [o.temperature_of(s) for s in options.SCENARIOS] == [0.0, 0.0, 0.7, 0.0, 0.7, 0.7, 0.0]
    assert [options.BenchOptions().temperature_of(s) for s in ("sparsifier", "quality")] == [1.0, 0.0]
    cmd = o.command_line()
    for flag in ("--temperature 0.7", "--policies exact,importance", "--strengths 0.25,1", "--no-baseline",
                 "--latencies 0,50", "--gammas 1,4", "--adaptive online"):
        assert flag in cmd
    g = o.grid
    assert (g.lengths_latencies_ms, g.latencies_ms, g.lengths_gammas, g.lengths_adaptive) == (
        (0.0, 50.0), (0.0, 50.0), (1, 4), ("online",))
    assert options.problem_seed(0, 3) != options.problem_seed(0, 4) != options.problem_seed(1, 4)
    assert options.problem_seed(0, 3) == options.problem_seed(0, 3, 0) < 2**31


def test_lengths_warm_up_serves_unmeasured_problems_first(text_models, tmp_path, monkeypatch):
    served = []
    original = lengths.warm_up

    def spy(b, engine, runs, latency_ms, common):
        calls = engine.generate

        def generate(prompt, **kw):
            served.append((prompt, kw.get("draft_length"), "gamma" in kw))
            return calls(prompt, **kw)

        monkeypatch.setattr(engine, "generate", generate)
        try:
            return original(b, engine, runs, latency_ms, common)
        finally:
            monkeypatch.setattr(engine, "generate", calls)

    monkeypatch.setattr(lengths, "warm_up", spy)
    s = _bench(tmp_path, text_models, scenarios=("lengths",), adaptive=("heuristic", "online"),
               warmup_problems=(55,))["scenarios"]["lengths"]
    assert s["warmup_prompts"] == ["HumanEval/55"]
    prompt = dict(humaneval((55,)))["HumanEval/55"]
    # each adaptive policy, not told a gamma (it must resume), at each latency; no static gamma
    assert served == [(prompt, "heuristic", False), (prompt, "online", False)] * 2
    for p in s["points"]:
        assert set(p["warmup"]["mean_gamma"]) == {"heuristic", "online"}
        assert all(g >= 1 for g in p["warmup"]["mean_gamma"].values())
        assert {r["prompt_id"] for r in p["runs"]} == {"HumanEval/53"}  # the warm-up is not measured
    assert "after serving HumanEval/55 unmeasured" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match=r"warmup_problems \[53\] are also measured"):
        options.BenchOptions(problems=PROBLEMS, warmup_problems=(53,))
