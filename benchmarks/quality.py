"""The ``quality`` scenario of ``specmesh bench``: HumanEval pass@1 beside speed, per acceptance policy.

Every variant (target-only, ``exact`` and the lossy policies, ``importance`` at each strength asked
for) runs the same problems with the same seed per problem (:func:`~.options.problem_seed`), so a
sampled run repeats and the variants meet the same draws where they agree. The report sets pass@1,
acceptance, mean accepted length, tokens/s and the speed ratio to ``exact`` side by side, and
:func:`default_strength` picks ``importance``'s default strength from the measured trade-off.
"""
from __future__ import annotations

from specmesh.cluster.compare import BASELINE, Variant
from specmesh.policies.catalog import ACCEPTANCE, is_lossless
from specmesh.policies.lossy import DEFAULT_STRENGTH

from . import humaneval_eval
from .options import BenchOptions, problem_seed
from .prompts import humaneval_problem
from .runner import Bench, config_dict, stat

EXACT = "specmesh exact"
IMPORTANCE = "importance"
PEERS = ("typical", "fly")  # the published lossy rules the importance policy is measured against
TOLERANCE_PROBLEMS = 1  # the bar: pass@1 at most this many problems below exact's
GOAL_GAIN = 1.15  # ... at >= 15% more tokens/s than exact
DEFAULT_STRENGTH_RULE = (
    f"the importance strength with the highest mean tokens/s among those whose pass@1 is at most "
    f"{TOLERANCE_PROBLEMS} problem below exact's (pass@1 x problems, so with several samples per problem "
    "the bar is one problem's worth of expected passes); ties go to the smaller strength; none when no "
    "strength qualifies"
)


def variants(options: BenchOptions) -> list[Variant]:
    """What ``quality`` runs, in order: target-only (unless ``--no-baseline``), then every policy of
    ``--policies`` (default: ``exact`` and every lossy one), ``importance`` once per ``--strengths``."""
    names = list(options.policies or ["exact"] + [n for n in ACCEPTANCE.names() if not is_lossless(n)])
    out = [BASELINE] if options.baseline else []
    for name in names:
        if name == IMPORTANCE and options.strengths:
            out += [Variant(f"specmesh importance {s:g}", {"acceptance": IMPORTANCE,
                                                            "policy_options": {"importance_strength": s}})
                    for s in options.strengths]
        else:
            out.append(Variant(f"specmesh {name}", {"acceptance": name}))
    return out


def quality_gamma(options: BenchOptions) -> int | None:
    """The draft length every ``quality`` variant runs at: ``--gammas`` when it names one (the
    engine's ``gamma`` when not given). Every variant, ``exact`` included, runs at the same gamma."""
    if not options.gammas:
        return None
    if len(options.gammas) != 1:
        raise ValueError(f"--gammas {','.join(map(str, options.gammas))}: quality runs every variant at one "
                         "gamma; give one value (run the gamma and lengths sweeps separately)")
    return options.gammas[0]


def scenario_quality(b: Bench) -> dict:
    """HumanEval pass@1 of target-only, exact SpecMesh and each lossy acceptance policy."""
    gamma = quality_gamma(b.options)
    problems = [humaneval_problem(i) for i in b.options.problems]
    self_check = humaneval_eval.self_check(problems)
    engine, topo, _ = b.engine(1, 0.0)
    if engine.tokenizer is None:
        return {"skipped": f"{b.models.target} has no tokenizer: no code to run (the harness self-check ran)",
                "self_check": self_check}
    runs = variants(b.options)
    n = b.grid.prompts.get("quality", len(problems))
    indices = list(b.options.problems[:n])
    prompts = [(p["task_id"], p["prompt"]) for p in problems[:n]]
    temperature = b.options.temperature_of("quality")
    repeats = b.options.repeats or 1  # at temperature > 0 each repetition is one more sample per problem
    m = b.measure("quality", engine, prompts, runs, repeats=repeats,
                  common={"max_new_tokens": b.tokens("quality"), "stop": humaneval_eval.STOP_SEQUENCES,
                          "temperature": temperature, **({"gamma": gamma} if gamma else {})},
                  seeds=lambda i, r: problem_seed(b.options.seed, indices[i], r))
    by_id = {p["task_id"]: p for p in problems}
    checks: dict[str, list] = {}
    for row in m["runs"]:
        completion = humaneval_eval.truncate(row["text"])
        res = humaneval_eval.check(by_id[row["prompt_id"]], completion)
        row.update(completion=completion, passed=res.passed, result=res.result)
        checks.setdefault(row["variant"], []).append(res)
    m["pass_at_1"] = {v: humaneval_eval.pass_at_1(rs) for v, rs in checks.items()}
    m["passed"] = {v: sum(r.passed for r in rs) for v, rs in checks.items()}
    labels = [v.label for v in runs]
    if EXACT in labels:
        exact = m["summary"][EXACT]["tokens_per_s"]["values"]
        for label in labels:
            mine = m["summary"][label]["tokens_per_s"]["values"]
            m["summary"][label]["vs_exact"] = stat([a / e if a and e else None for a, e in zip(mine, exact)])
    section = {
        "problems": [p for p, _ in prompts], "problem_indices": indices, "max_new_tokens": b.tokens("quality"),
        "temperature": temperature, "gamma": gamma or engine.config.gamma, "seed_rule": "problem_seed(--seed, problem index, repetition)",
        "stop": list(humaneval_eval.STOP_SEQUENCES), "links": topo.describe_links(), "self_check": self_check,
        "lossy_policies": [n for n in ACCEPTANCE.names() if not is_lossless(n)],
        "lossy": {v.label: not is_lossless(v.overrides.get("acceptance", "exact")) for v in runs},
        "strengths": {v.label: float(v.overrides.get("policy_options", {}).get("importance_strength",
                                                                                 DEFAULT_STRENGTH))
                      for v in runs if v.overrides.get("acceptance") == IMPORTANCE},
        "config": config_dict(engine), **m,
    }
    section["default_strength"] = default_strength(section)
    section["peers"] = peer_comparison(section)
    chosen = section["default_strength"]
    b.console.print(f"  quality: default strength {chosen['strength']}" if chosen["chosen"] else
                    f"  quality: no default strength ({chosen['reason']})")
    return section


def _tps(section: dict, label: str) -> float | None:
    return section["summary"][label]["tokens_per_s"]["mean"]


def default_strength(section: dict) -> dict:
    """The default ``importance_strength`` by :data:`DEFAULT_STRENGTH_RULE`, from a quality section
    (its ``strengths``, ``pass_at_1``, ``problems`` and per-variant mean tokens/s).

    Returns ``rule``, ``candidates`` (every strength: pass@1, problems below exact, tokens/s, ratio to
    exact, whether it qualifies), ``chosen`` (label or None), ``strength``, ``vs_exact``, ``goal_met``
    (>= ``GOAL_GAIN`` x exact's tokens/s) and, when nothing is chosen, ``reason``.
    """
    out = {"rule": DEFAULT_STRENGTH_RULE, "candidates": [], "chosen": None, "strength": None,
           "vs_exact": None, "goal_met": None}
    strengths = section.get("strengths", {})
    if len(strengths) < 2:
        return {**out, "reason": "fewer than two importance strengths were measured (give --strengths)"}
    if EXACT not in section["pass_at_1"]:
        return {**out, "reason": "exact was not run (add it to --policies)"}
    n = len(section["problems"])
    p_exact, t_exact = section["pass_at_1"][EXACT], _tps(section, EXACT)
    for label, strength in sorted(strengths.items(), key=lambda kv: kv[1]):
        below = (p_exact - section["pass_at_1"][label]) * n
        tps = _tps(section, label)
        out["candidates"].append({
            "label": label, "strength": strength, "pass_at_1": section["pass_at_1"][label],
            "problems_below_exact": below, "tokens_per_s": tps,
            "vs_exact": tps / t_exact if tps and t_exact else None,
            "qualifies": below <= TOLERANCE_PROBLEMS + 1e-9 and tps is not None,
        })
    ok = [c for c in out["candidates"] if c["qualifies"]]
    if not ok:
        return {**out, "reason": f"no strength keeps pass@1 within {TOLERANCE_PROBLEMS} problem of exact"}
    best = max(ok, key=lambda c: (c["tokens_per_s"], -c["strength"]))
    gain = best["vs_exact"]
    return {**out, "chosen": best["label"], "strength": best["strength"], "vs_exact": gain,
            "goal_met": gain is not None and gain >= GOAL_GAIN}


def peer_comparison(section: dict) -> list[dict]:
    """Per peer (``typical``, ``fly``) that ran: the fastest importance variant whose pass@1 is at
    least the peer's (equal or better quality), and its tokens/s over the peer's (> 1: it beats it)."""
    out = []
    for peer in (f"specmesh {p}" for p in PEERS):
        if peer not in section["pass_at_1"]:
            continue
        p_peer, t_peer = section["pass_at_1"][peer], _tps(section, peer)
        rivals = [lab for lab in section.get("strengths", {})
                  if section["pass_at_1"][lab] >= p_peer - 1e-12 and _tps(section, lab) is not None]
        best = max(rivals, key=lambda lab: _tps(section, lab), default=None)
        ratio = _tps(section, best) / t_peer if best and t_peer else None
        out.append({"peer": peer, "pass_at_1": p_peer, "tokens_per_s": t_peer, "importance": best,
                    "importance_pass_at_1": section["pass_at_1"][best] if best else None,
                    "ratio": ratio, "beats": ratio is not None and ratio > 1})
    return out
