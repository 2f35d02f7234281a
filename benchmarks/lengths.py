"""The ``lengths`` scenario of ``specmesh bench``: tokens/s against the draft length, static and adaptive.

At each per-hop latency (one engine each, in process, the link model delaying every hop) the static
gammas of the sweep and every adaptive draft-length policy run side by side on the same prompts and
seeds. An adaptive policy runs as an engine runs it: its first session starts afresh at the engine's
gamma (``lengths_start_gamma``), and each later one (the next prompt, the next repetition) resumes
the state the last one ended with (``SpecMesh`` carries it; ``policies.draft_length.resume``). A
session is a few dozen rounds, and relearning from scratch every prompt is not how an engine that
serves many requests runs. With ``--warmup-problems`` the first sessions are those problems, served
unmeasured (:func:`warm_up`): the measured prompts then meet an engine that has served requests on
these links before, as a server's would, instead of one just started. :func:`compare_to_best_static` finds the best static gamma of the sweep and where each
variant lands relative to it (the issue's goal: an adaptive policy within 5% of it, without being told
the links). No target-only baseline runs: the best static gamma is the reference.
"""
from __future__ import annotations

import math

import numpy as np

from specmesh.cluster.compare import Variant

from .length_replay import replay_point
from .options import Grid, problem_seed
from .runner import Bench, config_dict, stat

STATIC = "fixed"
WITHIN = 0.95  # the goal: an adaptive policy's tokens/s at least this share of the best static gamma's


def variants(grid: Grid) -> list[Variant]:
    """The static sweep (``fixed gamma=g``), then each adaptive policy with no gamma given (an explicit
    gamma would start every session afresh: the engine's first starts at its ``gamma``)."""
    out = [Variant(f"{STATIC} gamma={g}", {"draft_length": STATIC, "gamma": g}) for g in grid.lengths_gammas]
    out += [Variant(name, {"draft_length": name}) for name in grid.lengths_adaptive]
    return out


def scenario_lengths(b: Bench) -> dict:
    """Tokens/s of every static gamma and adaptive policy, per per-hop latency."""
    grid = b.grid
    prompts, n_tokens = b.prompts("lengths"), b.tokens("lengths")
    temperature = b.options.temperature_of("lengths")
    # a prompt's index: its HumanEval index (real pair) or its place among the random prompts (tiny)
    indices = list(b.options.problems) if b.options.models != "tiny" else list(range(len(prompts)))
    runs, points = variants(grid), []
    for lat in grid.lengths_latencies_ms:
        engine, topo, path = b.engine(grid.lengths_stages, lat)
        if engine.config.gamma != grid.lengths_start_gamma:
            raise ValueError(f"lengths_start_gamma {grid.lengths_start_gamma}: the bench's engines start "
                             f"adaptive sessions at their gamma, {engine.config.gamma}")
        engine.forget_draft_lengths()  # what an earlier scenario's sessions taught it
        warmed = warm_up(b, engine, runs, lat, {"max_new_tokens": n_tokens, "temperature": temperature})
        m = b.measure(f"lengths: {lat:g} ms/hop", engine, prompts, runs,
                      common={"max_new_tokens": n_tokens, "temperature": temperature},
                      seeds=lambda i, r: problem_seed(b.options.seed, indices[i], r))
        add_mean_gamma(m)
        point = {"latency_ms": lat, "links": topo.describe_links(), "topology_file": str(path),
                 "config": config_dict(engine), "warmup": warmed, **m}
        point["best_static"] = compare_to_best_static(point)
        point["modelled"] = modelled_rates(point)
        point["replayed"] = replay_point(point, max_new_tokens=n_tokens, start_gamma=grid.lengths_start_gamma,
                                         seed=b.options.seed)
        best, mod = point["best_static"], point["modelled"]
        ratios = ", ".join(f"{v.label} {point['summary'][v.label]['vs_best_static']['mean']:.2f}x"
                           for v in runs if v.overrides["draft_length"] != STATIC
                           and point["summary"][v.label]["vs_best_static"]["mean"] is not None)
        b.console.print(f"  lengths {lat:>5g} ms: best static gamma {best['gamma']} "
                        f"({best['tokens_per_s']:.2f} tok/s); {ratios}")
        if mod is not None:
            b.console.print(f"  modelled (clock noise out): best static {mod['best']}; " + ", ".join(
                f"{lab} {r:.2f}x" for lab, r in mod["vs_best_static"].items() if not lab.startswith(STATIC)))
        rep = point["replayed"]
        if rep is not None:
            b.console.print(f"  replayed ({rep['seeds']} noise draws, cold start): best static {rep['best']}; "
                            + ", ".join(f"{lab} {r['mean']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"
                                        for lab, r in rep["vs_best_static"].items() if not lab.startswith(STATIC)))
        points.append(point)
    return {"prompts": [p for p, _ in prompts], "max_new_tokens": n_tokens, "temperature": temperature,
            "num_stages": grid.lengths_stages, "gammas": list(grid.lengths_gammas),
            "adaptive": list(grid.lengths_adaptive), "start_gamma": grid.lengths_start_gamma,
            "within": WITHIN, "bandwidth_mbps": b.options.bandwidth_mbps,
            "warmup_prompts": [p for p, _ in b.warmup_prompts()], "points": points}


def warm_up(b: Bench, engine, runs: list[Variant], latency_ms: float, common: dict) -> dict:
    """Serves ``--warmup-problems`` once with every adaptive variant, unmeasured (each resumes what it
    learnt when the measured prompts begin); the static ones keep no state and skip it. Returns the
    warm-up's drafted tokens per round per adaptive variant (empty without warm-up problems)."""
    prompts = b.warmup_prompts()
    adaptive = [v for v in runs if v.overrides["draft_length"] != STATIC]
    if not prompts:
        return {}
    task = b.progress.add_task(f"lengths: {latency_ms:g} ms/hop, warm-up", total=len(prompts) * len(adaptive))
    mean_gamma = {}
    for v in adaptive:
        rounds = drafted = 0
        for index, (_, prompt) in zip(b.options.warmup_problems, prompts):
            res = engine.generate(prompt, **{**common, "seed": problem_seed(b.options.seed, index), **v.overrides})
            rounds, drafted = rounds + res.stats.rounds, drafted + res.stats.drafted
            b.progress.advance(task)
        mean_gamma[v.label] = drafted / rounds if rounds else None
    b.progress.remove_task(task)
    return {"mean_gamma": mean_gamma}


def add_mean_gamma(measured: dict) -> None:
    """Adds ``mean_gamma`` (drafted tokens per round, per repetition, as :func:`~.runner.stat`) to
    every variant's summary: where an adaptive policy's draft length actually sat."""
    for v in measured["variants"]:
        per = []
        for r in range(measured["repeats"]):
            mine = [x for x in measured["runs"] if x["variant"] == v["label"] and x["repeat"] == r]
            rounds = sum(x["rounds"] for x in mine)
            per.append(sum(x["drafted"] for x in mine) / rounds if rounds else None)
        measured["summary"][v["label"]]["mean_gamma"] = stat(per)


def compare_to_best_static(point: dict) -> dict | None:
    """The best static gamma of one latency's sweep, and every variant's tokens/s relative to it.

    The best is the static variant (``draft_length`` ``fixed``) of highest mean tokens/s. Each
    variant's summary gets ``vs_best_static``: its tokens/s over the best's, within each repetition,
    as :func:`~.runner.stat`, and ``within_goal`` (that ratio's mean >= :data:`WITHIN`). Returns
    ``label``, ``gamma`` and ``tokens_per_s`` of the best, or None when no static gamma ran.
    """
    summary = point["summary"]
    static = [v for v in point["variants"] if v["overrides"].get("draft_length") == STATIC]
    measured = [v for v in static if summary[v["label"]]["tokens_per_s"]["mean"] is not None]
    if not measured:
        return None
    best = max(measured, key=lambda v: summary[v["label"]]["tokens_per_s"]["mean"])
    ref = summary[best["label"]]["tokens_per_s"]["values"]
    for v in point["variants"]:
        s = summary[v["label"]]
        ratios = [a / c if _finite(a) and _finite(c) and c > 0 else None
                  for a, c in zip(s["tokens_per_s"]["values"], ref)]
        s["vs_best_static"] = stat(ratios)
        mean = s["vs_best_static"]["mean"]
        s["within_goal"] = None if mean is None else mean >= WITHIN
    return {"label": best["label"], "gamma": best["overrides"]["gamma"],
            "tokens_per_s": summary[best["label"]]["tokens_per_s"]["mean"]}


def modelled_rates(point: dict) -> dict | None:
    """Every variant's tokens/s with the clock's noise taken out: each run's wall time replaced by a fit
    over every run of the point, ``per_run + per_round * rounds + per_drafted * drafted`` (least
    squares), so that a variant is judged on the rounds and drafts its choices cost, not on when the
    shared machine stalled. Under greedy decoding a run's acceptance is deterministic and only the
    clock is noisy: two runs of one static gamma differ by up to 10%, the size of the goal's band,
    and the best of a sweep of noisy figures is biased up. Returns the fit (seconds), the best static
    variant by it and every variant's ratio to it; None with fewer runs than unknowns."""
    runs = [r for r in point["runs"] if _finite(r.get("wall_s"))]
    if len(runs) < 3:
        return None
    x = np.array([[1.0, r["rounds"], r["drafted"]] for r in runs])  # [runs, 3]
    y = np.array([r["wall_s"] for r in runs])  # [runs]
    coef = np.linalg.lstsq(x, y, rcond=None)[0]  # [3]
    tokens: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for r, t in zip(runs, x @ coef):
        tokens[r["variant"]] = tokens.get(r["variant"], 0.0) + r["tokens"]
        seconds[r["variant"]] = seconds.get(r["variant"], 0.0) + float(t)
    rate = {v: tokens[v] / seconds[v] for v in tokens if seconds[v] > 0}
    static = [v["label"] for v in point["variants"]
              if v["overrides"].get("draft_length") == STATIC and v["label"] in rate]
    if not static:
        return None
    best = max(static, key=rate.get)
    return {"fit_s": {"per_run": float(coef[0]), "per_round": float(coef[1]), "per_drafted": float(coef[2])},
            "best": best, "tokens_per_s": rate, "vs_best_static": {v: rate[v] / rate[best] for v in rate}}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
