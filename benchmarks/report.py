"""Writes what ``specmesh bench`` measured: ``results.json``, ``report.md`` and one PNG per scenario.

Everything here reads the results dictionary alone (as built by :mod:`specmesh.benchmarks.suite`; the
plots are :mod:`specmesh.benchmarks.plots`), so a report can be rebuilt from a results file:
``python -m specmesh.benchmarks.report bench-out``.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from specmesh.actors.memory import describe_workers

from .plots import PLOTS, TOKENS_PER_S, close_figures, hf_variants
from .profile import profile_lines
from .report_policies import section_lengths, section_quality
from .tables import fmt, seconds, table, yes

RESULTS = "results.json"
REPORT = "report.md"


def clean(value):
    """JSON-safe copy: tuples and paths become lists and strings, nan becomes null, inf "inf"."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(results: dict, out: Path) -> Path:
    """Writes ``results.json`` (strict JSON: no NaN, no Infinity) into ``out``; returns its path."""
    path = Path(out) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(results), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def write(results: dict, out: Path) -> list[Path]:
    """Writes the results file, the plots and the Markdown report into ``out``; returns their paths."""
    out = Path(out)
    paths = [write_json(results, out)]
    data = clean(results)
    images = {}
    for name, section in data["scenarios"].items():
        plot = PLOTS.get(name)
        if plot is None or section.get("skipped"):
            continue
        try:
            images[name] = plot(section, out / f"{name}.png").name
            paths.append(out / images[name])
        except Exception as exc:  # a plot is a view of figures already saved: never lose a run to it
            close_figures()
            images[name] = None
            section["plot_error"] = f"{type(exc).__name__}: {exc}"
    paths.append(out / REPORT)
    paths[-1].write_text(markdown(data, images), encoding="utf-8")
    return paths


# ----- formatting (benchmarks.tables; the old private names kept for callers) -----

_table, _yes, _seconds = table, yes, seconds


def markdown(r: dict, images: dict[str, str]) -> str:
    """The whole report."""
    m, mach = r["models"], r["machine"]
    lines = [
        "# SpecMesh benchmark report", "",
        f"Reproduce: `{r['command']}`", "",
        f"- created {r['created']}; total run time {_seconds(r.get('elapsed_s'))}",
        f"- models: target `{m['target']}`, draft `{m['draft']}`, dtype {m['dtype']} "
        f"({m.get('dtype_resolved', m['dtype'])} here), {r['threads']} torch thread(s), "
        f"seed {r['seed']}, {r['repeats']} repetition(s)",
        f"- machine: {mach['platform']}, {mach['cpu_count']} CPUs ({mach.get('cpus_usable')} usable), "
        f"{mach['memory_gib']} GiB; load average at start {_load(mach.get('loadavg_start'))}, "
        f"at end {_load(mach.get('loadavg_end'))} (a shared machine makes timings noisy)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        "- figures: mean over the repetitions, min..max in parentheses; every ratio is taken within one "
        "repetition from measured tokens/s or bytes, the baseline run side by side in the same process "
        "run (interleaved per prompt), same prompts, links and seeds.",
        "",
    ]
    for name, section in r["scenarios"].items():
        lines += SECTIONS[name](section, images.get(name))
        if section.get("plot_error"):
            lines += [f"(plot failed: {section['plot_error']})", ""]
        lines += [f"Run time: {_seconds(section.get('elapsed_s'))}.", ""]
    return "\n".join(lines)


def _load(avg) -> str:
    return "-" if not avg else "/".join(f"{x:.1f}" for x in avg)


def _bandwidth(mbps) -> str:
    return "unlimited" if mbps == "inf" else f"{mbps:g} Mbit/s"


def _config_line(cfg: dict) -> str:
    return (f"gamma {cfg['gamma']} ({cfg['draft_length']}), sparsifier {cfg['sparsifier']} "
            f"(k {cfg['sparse_k']}), acceptance {cfg['acceptance']}, temperature {cfg['temperature']}")


# ----- sections -----

def section_latency(s: dict, image: str | None) -> list[str]:
    pts = s["points"]
    stages = list(dict.fromkeys(p["num_stages"] for p in pts))
    lats = list(dict.fromkeys(p["latency_ms"] for p in pts))
    cell = {(p["num_stages"], p["latency_ms"]): p for p in pts}
    lines = ["## latency: speedup over target-only pipelined decoding vs per-hop link latency", "",
             f"Prompts {', '.join(s['prompts'])}; {s['max_new_tokens']} new tokens; SpecMesh "
             f"{_config_line(pts[0]['config'])}. Every hop of a round (device -> stage 1 -> ... -> device) "
             f"has the stated latency; bandwidth {_bandwidth(s['bandwidth_mbps'])}. "
             "Speedup = SpecMesh tokens/s / target-only tokens/s:", ""]
    rows = [[f"{n} stage(s)"] + [fmt(cell[(n, lat)]["summary"]["specmesh"]["speedup"], ".2f", "x")
                                 if (n, lat) in cell else "-" for lat in lats] for n in stages]
    lines += _table(["stages \\ latency per hop"] + [f"{lat:g} ms" for lat in lats], rows) + [""]
    detail = []
    for p in pts:
        base, spec = p["summary"][p["baseline"]], p["summary"]["specmesh"]
        detail.append([p["num_stages"], f"{p['latency_ms']:g}", fmt(base["tokens_per_s"]),
                       fmt(spec["tokens_per_s"]), fmt(spec["mean_accepted_length"]), fmt(spec["acceptance_rate"]),
                       _yes(spec["same_output_as_baseline"])])
    lines += _table(["stages", "ms/hop", "target-only tok/s", "SpecMesh tok/s", "mean acc. len", "acceptance",
                     "same output"], detail) + [""]
    lines += profile_lines([(f"{p['num_stages']} st, {p['latency_ms']:g} ms: ", p["runs"]) for p in pts])
    return lines + ([f"![latency]({image})", ""] if image else [])


# Columns of the per-variant tables: header -> how a variant's summary is shown.
_COLUMNS = {
    "tok/s": lambda x: fmt(x["tokens_per_s"]),
    "speedup": lambda x: fmt(x["speedup"], ".2f", "x"),
    "mean acc. len": lambda x: fmt(x["mean_accepted_length"]),
    "acceptance": lambda x: fmt(x["acceptance_rate"]),
    "uplink B/token": lambda x: fmt(x["bytes_up_per_token"], ".0f"),
    "downlink B/token": lambda x: fmt(x["bytes_down_per_token"], ".0f"),
    "saving vs dense": lambda x: fmt(x.get("uplink_saving_vs_dense"), ".1f", "x"),
    "same output": lambda x: _yes(x["same_output_as_baseline"]),
}


def _variant_table(s: dict, first: str, columns: list[str]) -> list[str]:
    rows = [[v["label"]] + [_COLUMNS[c](s["summary"][v["label"]]) for c in columns] for v in s["variants"]]
    return _table([first] + columns, rows) + [""]


def section_gamma(s: dict, image: str | None) -> list[str]:
    lines = ["## gamma: mean accepted length and speedup vs gamma, per draft-length policy", "",
             f"Prompts {', '.join(s['prompts'])}; {s['max_new_tokens']} new tokens; {s['num_stages']} stage(s), "
             f"links {s['links']}; greedy. Mean accepted length counts the bonus/correction token "
             "(target-only = 1). `heuristic` starts at the stated gamma (+2 after a full acceptance, -1 "
             "otherwise).", ""]
    lines += _variant_table(s, "variant", ["tok/s", "speedup", "mean acc. len", "acceptance", "same output"])
    lines += profile_lines([("", s["runs"])])
    return lines + ([f"![gamma]({image})", ""] if image else [])


def section_sparsifier(s: dict, image: str | None) -> list[str]:
    lines = ["## sparsifier: uplink bytes per generated token and acceptance vs q sparsifier", "",
             f"Prompts {', '.join(s['prompts'])}; {s['max_new_tokens']} new tokens; sampling at temperature "
             f"{s['temperature']} (greedy q is one-hot: every sparsifier would accept alike); vocabulary "
             f"{s['vocab_size']}; links {s['links']}. Uplink = every device -> stage-0 message (codec bytes, "
             "zstd above its threshold). top-p is uncapped. Speedup vs target-only; saving = dense uplink "
             "bytes / this sparsifier's.", ""]
    lines += _variant_table(s, "sparsifier", ["uplink B/token", "saving vs dense", "acceptance", "mean acc. len",
                                              "downlink B/token", "tok/s", "speedup"])
    lines += profile_lines([("", s["runs"])])
    return lines + ([f"![sparsifier]({image})", ""] if image else [])


def section_hf(s: dict, image: str | None) -> list[str]:
    summ = s["summary"]
    variants = hf_variants(s)
    lines = ["## hf: SpecMesh in-process vs transformers assisted generation", "",
             f"Prompts {', '.join(s['prompts'])}; up to {s['max_new_tokens']} new tokens (both stop at EOS); "
             f"greedy; {s['threads']} torch thread(s) for both; SpecMesh {_config_line(s['config'])}, one "
             f"stage, links {s['links']}. transformers `generate(assistant_model=draft, do_sample=False)` with "
             f"the assistant's settings as shipped: {s['assistant_settings']} (None = transformers' default).",
             ""]
    ratio_cols = [k for k in next(iter(summ.values())) if not k.startswith(TOKENS_PER_S)]
    rows = [[scope] + [fmt(e[TOKENS_PER_S + v]) for v in variants] + [fmt(e[k], ".2f", "x") for k in ratio_cols]
            for scope, e in summ.items()]
    lines += _table(["prompt"] + [f"{v} tok/s" for v in variants] + ratio_cols, rows) + [""]
    lines += ["Outputs (the first repetition; a split is checked against the target's logits from one "
              "forward over the shared prefix; near tie = the two tokens' logits within "
              f"{s['near_tie_logits']} of each other):", ""]
    rows = []
    for entry in s["identity"]:
        for pair in [k for k in entry if " vs " in k]:
            d = entry[pair]
            split = "-" if d["identical"] else (
                f"lengths {d['len_a']}/{d['len_b']}" if "index" not in d else
                f"token {d['index']}: {d.get('text_a', d['token_a'])!r} vs {d.get('text_b', d['token_b'])!r}")
            rows.append([entry["prompt_id"], pair, _yes(d["identical"]), split,
                         f"{d['margin']:.3f}" if "margin" in d else "-", _yes(d.get("near_tie"))])
    lines += _table(["prompt", "outputs", "identical", "first split", "logit margin", "near tie"], rows) + [""]
    lines += profile_lines([("", s["runs"])])
    return lines + ([f"![hf]({image})", ""] if image else [])


def section_llamacpp(s: dict, image: str | None) -> list[str]:
    lines = ["## llamacpp: SpecMesh beside llama.cpp on the bundled target's own GGUF", ""]
    if s.get("skipped"):
        return lines + [f"Skipped: {s['skipped']}.", ""]
    summ, variants = s["summary"], hf_variants(s)
    cfg = s["config"]
    lines += [f"Prompts {', '.join(s['prompts'])}; up to {s['max_new_tokens']} new tokens (all stop at EOS); "
              f"greedy; {s['threads']} thread(s) for both, prompt evaluation timed with the generation. "
              f"llama.cpp: plain decoding of `{s['gguf']}`. SpecMesh: {_config_line(cfg)}, one stage, links "
              f"{s['links']}, weights {cfg.get('weights')}, draft weights {cfg.get('draft_weights')}.", ""]
    ratio_cols = [k for k in next(iter(summ.values())) if not k.startswith(TOKENS_PER_S)]
    rows = [[scope] + [fmt(e[TOKENS_PER_S + v]) for v in variants] + [fmt(e[k], ".2f", "x") for k in ratio_cols]
            for scope, e in summ.items()]
    lines += _table(["prompt"] + [f"{v} tok/s" for v in variants] + ratio_cols, rows) + [""]
    rows = []
    for pid, d in s.get("specmesh_equals_target_only", {}).items():
        split = "-" if d["identical"] else (f"lengths {d['len_a']}/{d['len_b']}" if "index" not in d else
                                            f"token {d['index']}: {d.get('text_a', d['token_a'])!r} vs "
                                            f"{d.get('text_b', d['token_b'])!r}")
        rows.append([pid, _yes(d["identical"]), split, f"{d['margin']:.3f}" if "margin" in d else "-"])
    lines += ["SpecMesh's output against its own target-only decoding (greedy, same weights; a split is "
              "checked against the target's logits, as it runs, from one forward over the shared prefix):", ""]
    lines += _table(["prompt", "identical", "first split", "logit margin"], rows) + [""]
    workers = [f"- {line}" for line in describe_workers(s.get("workers", []))]
    lines += (["Workers (weight formats that ran, resident memory):", *workers, ""] if workers else [])
    lines += profile_lines([("", [r for r in s["runs"] if r["variant"] != "llama.cpp"])])
    return lines + ([f"![llamacpp]({image})", ""] if image else [])


SECTIONS = {"latency": section_latency, "gamma": section_gamma, "sparsifier": section_sparsifier,
            "hf": section_hf, "quality": section_quality, "lengths": section_lengths,
            "llamacpp": section_llamacpp}


if __name__ == "__main__":  # rebuild report.md and the plots from DIR/results.json
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out")
    for p in write(json.loads((folder / RESULTS).read_text()), folder):
        print(p)
