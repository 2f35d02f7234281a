"""The report sections of the policy scenarios: ``quality`` (acceptance policies: pass@1 beside speed)
and ``lengths`` (draft-length policies against the best static gamma), from ``results.json`` alone."""
from __future__ import annotations

from .profile import profile_lines
from .tables import fmt, table, yes


def _sampling(temperature) -> str:
    return "greedy" if not temperature else f"sampled at temperature {temperature:g}"


def _image(name: str, image: str | None) -> list[str]:
    return [f"![{name}]({image})", ""] if image else []


def section_quality(s: dict, image: str | None) -> list[str]:
    lines = ["## quality: HumanEval pass@1 beside speed, per acceptance policy", ""]
    checks = s["self_check"]
    harness = ", ".join(f"{c['task_id']} canonical {c['canonical']}, empty {c['empty']}" for c in checks)
    if s.get("skipped"):
        return lines + [f"Skipped: {s['skipped']}.", "", f"Harness self-check: {harness}.", ""]
    lossy = ", ".join(s["lossy_policies"]) or "none registered besides exact"
    repeats = s.get("repeats", 1)
    lines += [f"Problems {', '.join(s['problems'])}; {_sampling(s.get('temperature'))}, "
              f"gamma {s.get('gamma', '-')}, {repeats} sample(s) per problem, seed per problem and sample = {s.get('seed_rule', '--seed')} "
              f"(the same for every variant); up to {s['max_new_tokens']} new tokens, stop sequences "
              f"{s['stop']!r}; each completion run against the problem's tests in its own Python subprocess "
              f"with a timeout; links {s['links']}. **Lossy** policies (opt-in, they change the output "
              f"distribution): {lossy}. vs exact = tokens/s over `specmesh exact`'s; speedup = over "
              "target-only.", ""]
    rows = []
    for v in s["variants"]:
        label = v["label"]
        mine = [r for r in s["runs"] if r["variant"] == label]
        x = s["summary"][label]
        base = label == s["baseline"]
        rows.append([label, yes(s.get("lossy", {}).get(label)), f"{s['pass_at_1'][label]:.3f}",
                     f"{sum(r['passed'] for r in mine)}/{len(mine)}",
                     "-" if base else fmt(x["acceptance_rate"]), fmt(x["mean_accepted_length"]),
                     fmt(x["tokens_per_s"]), fmt(x.get("vs_exact"), ".2f", "x"), fmt(x["speedup"], ".2f", "x"),
                     "-" if base else yes(x["same_output_as_baseline"])])
    lines += table(["variant", "lossy", "pass@1", "passed", "acceptance", "mean acc. len", "tok/s", "vs exact",
                    "speedup", "same output"], rows) + [""]
    lines += _default_strength_lines(s.get("default_strength"), s.get("peers", []))
    labels = [v["label"] for v in s["variants"]]
    cells: dict[tuple, dict] = {}
    for r in s["runs"]:
        cells.setdefault((r["prompt_id"], r["repeat"]), {})[r["variant"]] = (
            f"{'pass' if r['passed'] else r['result'].split(':')[0]} ({r['tokens']} tok, {r['finish_reason']})")
    rows = [[pid, rep, *(row.get(lab, "-") for lab in labels)] for (pid, rep), row in cells.items()]
    lines += ["Per problem (verdict, tokens, finish reason):", ""]
    lines += table(["problem", "sample", *labels], rows) + [""]
    lines += profile_lines([("", s["runs"])])
    lines += [f"Harness self-check: {harness}.", ""]
    return lines + _image("quality", image)


def _default_strength_lines(d: dict | None, peers: list[dict]) -> list[str]:
    if not d:
        return []
    lines = [f"**Default importance strength.** Rule: {d['rule']}."]
    if d["chosen"] is None:
        lines += [f"No default chosen: {d['reason']}.", ""]
    else:
        goal = "met" if d["goal_met"] else "not met"
        lines += [f"Chosen: **{d['strength']:g}** (`{d['chosen']}`), {d['vs_exact']:.2f}x exact's tokens/s "
                  f"(goal >= 1.15x at <= 1 problem below exact: {goal}).", ""]
    if d["candidates"]:
        rows = [[f"{c['strength']:g}", f"{c['pass_at_1']:.3f}", f"{c['problems_below_exact']:+.1f}",
                 "-" if c["tokens_per_s"] is None else f"{c['tokens_per_s']:.2f}",
                 "-" if c["vs_exact"] is None else f"{c['vs_exact']:.2f}x", yes(c["qualifies"])]
                for c in d["candidates"]]
        lines += table(["strength", "pass@1", "problems below exact", "tok/s", "vs exact", "qualifies"], rows) + [""]
    for p in peers:
        if p["importance"] is None:
            lines.append(f"- vs `{p['peer']}` (pass@1 {p['pass_at_1']:.3f}): no importance variant reached its pass@1.")
        else:
            lines.append(f"- vs `{p['peer']}` (pass@1 {p['pass_at_1']:.3f}): fastest importance variant at equal "
                         f"or better pass@1 is `{p['importance']}` ({p['importance_pass_at_1']:.3f}), "
                         f"{p['ratio']:.2f}x its tokens/s ({'beats it' if p['beats'] else 'does not beat it'}).")
    return lines + ([""] if peers else [])


def _replayed_lines(pts: list[dict], adaptive: list[str]) -> list[str]:
    """The replay of every point (``benchmarks/length_replay.py``), where one ran."""
    reps = [(p, p.get("replayed")) for p in pts if p.get("replayed")]
    if not reps:
        return []
    names = [a for a in adaptive if a in reps[0][1]["vs_best_static"]]
    rows = [[f"{p['latency_ms']:g} ms", r["best"].removeprefix("fixed gamma="),
             *[f"{r['vs_best_static'][a]['mean']:.2f}x ({r['vs_best_static'][a]['min']:.2f}-"
               f"{r['vs_best_static'][a]['max']:.2f})" for a in names],
             f"{r['positions']} / {r['imputed']} / {r['conflicts']}"] for p, r in reps]
    return [f"Replayed, the clock's noise out: each policy served again on the acceptance sequence the point's "
            f"own rounds recorded and their median cost per gamma, starting cold, over {reps[0][1]['seeds']} "
            "draws of the measured round-time noise (mean, min-max), ratio to the best replayed static gamma:",
            ""] + table(["latency per hop", "best static gamma", *names, "positions / imputed / conflicts"],
                        rows) + [""]


def section_lengths(s: dict, image: str | None) -> list[str]:
    pts = s["points"]
    lines = ["## lengths: tokens/s vs draft length, static gammas and adaptive policies", "",
             f"Prompts {', '.join(s['prompts'])}; up to {s['max_new_tokens']} new tokens; "
             f"{_sampling(s.get('temperature'))}; {s['num_stages']} stage(s) in one process, every hop delayed "
             f"by the link model (no overlap: a round is draft, links and verification in turn). Static: "
             f"`fixed` at gamma {', '.join(map(str, s['gammas']))}; adaptive ({', '.join(s['adaptive'])}) start "
             + (f"after serving {', '.join(s['warmup_prompts'])} unmeasured at the same latency (from gamma "
                f"{s['start_gamma']}), resume the engine's learned state on every measured prompt "
                if s.get("warmup_prompts") else
                f"at gamma {s['start_gamma']} on the first prompt, resume the engine's learned state on the next ones ")
             + f"and are not told the links. Ratio = tokens/s over the best static "
             f"gamma's at that latency, within each repetition; goal: an adaptive policy >= {s['within']:.2f}. "
             "mean gamma = drafted tokens per round.", ""]
    adaptive = s["adaptive"]
    rows = []
    for p in pts:
        best = p["best_static"]
        head = ["-", "-"] if best is None else [str(best["gamma"]), f"{best['tokens_per_s']:.2f}"]
        cells = []
        for name in adaptive:
            x = p["summary"][name]
            cells.append(f"{fmt(x['vs_best_static'], '.2f', 'x')} ({'within' if x['within_goal'] else 'below'})"
                         if x.get("within_goal") is not None else "-")
        rows.append([f"{p['latency_ms']:g} ms", *head, *cells])
    lines += table(["latency per hop", "best static gamma", "its tok/s", *adaptive], rows) + [""]
    detail = []
    for p in pts:
        for v in p["variants"]:
            x = p["summary"][v["label"]]
            detail.append([f"{p['latency_ms']:g}", v["label"], fmt(x["mean_gamma"]), fmt(x["tokens_per_s"]),
                           fmt(x["vs_best_static"], ".2f", "x"), fmt(x["mean_accepted_length"]),
                           fmt(x["acceptance_rate"])])
    lines += table(["ms/hop", "variant", "mean gamma", "tok/s", "vs best static", "mean acc. len", "acceptance"],
                   detail) + [""]
    lines += _replayed_lines(pts, adaptive)
    lines += ["Links: " + "; ".join(f"{p['latency_ms']:g} ms: {p['links']}" for p in pts) + ".", ""]
    lines += profile_lines([(f"{p['latency_ms']:g} ms: ", p["runs"]) for p in pts])
    return lines + _image("lengths", image)
