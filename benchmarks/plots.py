"""The plots of the ``specmesh bench`` report: one PNG per scenario, drawn from ``results.json`` alone."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

DPI = 110  # about 700 x 460 pixels for a 6.4 x 4.2 inch figure: sharp in a Markdown viewer, small files
TOKENS_PER_S = "tokens_per_s "  # prefix of the hf summary's per-variant throughput keys


def hf_variants(s: dict) -> list[str]:
    """The variants of the ``hf`` section, in the order they ran (target-only, specmesh, hf-greedy, ...)."""
    return [k.removeprefix(TOKENS_PER_S) for k in s["summary"]["all"] if k.startswith(TOKENS_PER_S)]


def close_figures() -> None:
    """Close every open figure (after a plot failed half-way)."""
    plt.close("all")


def _errorbar(ax, xs, stats, **kw):
    means = [st["mean"] for st in stats]
    # clamped: the mean of equal values may round a hair outside their range
    lo = [max(0.0, st["mean"] - st["min"]) for st in stats]
    hi = [max(0.0, st["max"] - st["mean"]) for st in stats]
    ax.errorbar(xs, means, yerr=[lo, hi], marker="o", capsize=3, **kw)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_latency(s: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n in dict.fromkeys(p["num_stages"] for p in s["points"]):
        pts = [p for p in s["points"] if p["num_stages"] == n]
        _errorbar(ax, [p["latency_ms"] for p in pts], [p["summary"]["specmesh"]["speedup"] for p in pts],
                  label=f"{n} stage(s)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="link latency per hop (ms)", ylabel="speedup over target-only",
           title="SpecMesh speedup vs link latency")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_gamma(s: dict, path: Path) -> Path:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    policies: dict[str, list] = {}
    for v in s["variants"]:
        if "gamma" in v["overrides"]:
            policies.setdefault(v["overrides"]["draft_length"], []).append(v)
    for policy, vs in policies.items():
        xs = [v["overrides"]["gamma"] for v in vs]
        _errorbar(a1, xs, [s["summary"][v["label"]]["mean_accepted_length"] for v in vs], label=policy)
        _errorbar(a2, xs, [s["summary"][v["label"]]["speedup"] for v in vs], label=policy)
    a1.set(xlabel="gamma (initial for heuristic)", ylabel="mean accepted length", title="tokens per round")
    a2.set(xlabel="gamma (initial for heuristic)", ylabel="speedup over target-only", title="speedup")
    a2.axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in (a1, a2):
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_sparsifier(s: dict, path: Path) -> Path:
    labels = [v["label"] for v in s["variants"] if v["label"] != s["baseline"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.bar(labels, [s["summary"][x]["bytes_up_per_token"]["mean"] for x in labels], color="tab:blue")
    a1.set(yscale="log", ylabel="uplink bytes per generated token", title="uplink bytes")
    a2.bar(labels, [s["summary"][x]["acceptance_rate"]["mean"] for x in labels], color="tab:green")
    a2.set(ylabel="acceptance rate", ylim=(0, 1), title=f"acceptance (temperature {s['temperature']})")
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=45)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_hf(s: dict, path: Path) -> Path:
    variants = hf_variants(s)
    scopes = list(s["summary"])
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(scopes))]
        ax.bar(xs, [s["summary"][sc][TOKENS_PER_S + v]["mean"] or 0 for sc in scopes], width, label=v)
    ax.set_xticks(range(len(scopes)), scopes)
    ax.set(ylabel="tokens/s", title="SpecMesh vs transformers (greedy, same pair, same threads)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_quality(s: dict, path: Path) -> Path:
    labels = [v["label"] for v in s["variants"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(labels, [s["pass_at_1"][x] for x in labels], color="tab:purple")
    ax.set(ylabel="pass@1", ylim=(0, 1.05), title=f"HumanEval pass@1 ({len(s['problems'])} problems)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


PLOTS = {"latency": plot_latency, "gamma": plot_gamma, "sparsifier": plot_sparsifier, "hf": plot_hf,
         "quality": plot_quality}
