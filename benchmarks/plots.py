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


def plot_hf(s: dict, path: Path, title: str = "SpecMesh vs transformers (greedy, same pair, same threads)") -> Path:
    variants = hf_variants(s)
    scopes = list(s["summary"])
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(scopes))]
        ax.bar(xs, [s["summary"][sc][TOKENS_PER_S + v]["mean"] or 0 for sc in scopes], width, label=v)
    ax.set_xticks(range(len(scopes)), scopes)
    ax.set(ylabel="tokens/s", title=title)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_quality(s: dict, path: Path) -> Path:
    """pass@1 against tokens/s, one point per variant (lossy ones hollow): the quality/speed trade-off."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, v in enumerate(s["variants"]):
        label = v["label"]
        tps = s["summary"][label]["tokens_per_s"]["mean"]
        if tps is None:
            continue
        lossy = s.get("lossy", {}).get(label, False)
        ax.plot([tps], [s["pass_at_1"][label]], "o", ms=7, mfc="none" if lossy else None,
                color="tab:red" if lossy else "tab:blue")
        ax.annotate(label.removeprefix("specmesh "), (tps, s["pass_at_1"][label]), textcoords="offset points",
                    xytext=(4, 4 + 9 * (i % 3)), fontsize=8)  # staggered: equal pass@1 is common
    temp = s.get("temperature") or 0
    ax.set(xlabel="tokens/s", ylabel="pass@1", ylim=(-0.03, 1.05),
           title=f"HumanEval pass@1 vs speed ({len(s['problems'])} problems, "
                 f"{'greedy' if not temp else f'T = {temp:g}'}; hollow = lossy)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_lengths(s: dict, path: Path) -> Path:
    """Per latency: tokens/s of the static gammas (line) and of each adaptive policy, placed at the mean
    gamma it drafted."""
    pts = s["points"]
    fig, axes = plt.subplots(1, len(pts), figsize=(4.8 * len(pts), 3.9), squeeze=False)
    for ax, p in zip(axes[0], pts):
        static = [v for v in p["variants"] if v["overrides"]["draft_length"] == "fixed"]
        _errorbar(ax, [v["overrides"]["gamma"] for v in static],
                  [p["summary"][v["label"]]["tokens_per_s"] for v in static], label="fixed", color="black")
        for v in p["variants"]:
            x = p["summary"][v["label"]]
            if v in static or x["mean_gamma"]["mean"] is None or x["tokens_per_s"]["mean"] is None:
                continue
            ax.plot([x["mean_gamma"]["mean"]], [x["tokens_per_s"]["mean"]], "s", ms=7, label=v["label"])
        if p["best_static"]:
            ax.axhline(p["best_static"]["tokens_per_s"] * s["within"], color="grey", lw=0.8, ls="--",
                       label=f"{s['within']:.0%} of best static")
        ax.set(xlabel="gamma (adaptive: mean drafted per round)", ylabel="tokens/s",
               title=f"{p['latency_ms']:g} ms per hop")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_llamacpp(s: dict, path: Path) -> Path:
    return plot_hf(s, path, title="SpecMesh vs llama.cpp on the same GGUF (greedy, same threads)")


PLOTS = {"latency": plot_latency, "gamma": plot_gamma, "sparsifier": plot_sparsifier, "hf": plot_hf,
         "llamacpp": plot_llamacpp,
         "quality": plot_quality, "lengths": plot_lengths}
