"""The engine options shared by ``specmesh run`` and ``specmesh serve``: declared once, each with the
help that teaches it, and turned into a :class:`SpecConfig` in one place."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from specmesh.runtime.config import DEFAULT_DRAFT, DEFAULT_TARGET, SpecConfig

from .topology import check_threads, load_topology

Topology = Annotated[Optional[Path], typer.Option(
    exists=True, dir_okay=False, help="Topology TOML: nodes (and their CPU cores), links, stage placement, models.")]
Backend = Annotated[str, typer.Option(
    help="inproc (one process) | local (Ray on this machine, a process per worker) | cluster (a Ray cluster).")]
Target = Annotated[Optional[str], typer.Option(
    help=f"Target model: bundled name, directory, HF id or tiny[:...]. [default: {DEFAULT_TARGET}]")]
Draft = Annotated[Optional[str], typer.Option(help=f"Draft model (same forms). [default: {DEFAULT_DRAFT}]")]
NoDraft = Annotated[bool, typer.Option("--no-draft", help="Target-only pipelined decoding (the baseline).")]
Stages = Annotated[Optional[int], typer.Option(help="Target pipeline stages (without --topology). [default: 2]")]
Gamma = Annotated[Optional[int], typer.Option(help="Draft tokens per round (the start, for adaptive policies). [default: 4]")]
TreeWidth = Annotated[Optional[int], typer.Option(help="Candidates per depth: 1 = a chain; c > 1 = a token tree. [default: 1]")]
DraftLength = Annotated[Optional[str], typer.Option(
    help="Draft-length policy: fixed | heuristic (HF: +2 / -1) | confidence (HF: stop below 0.4) | tkslt "
         "(TK-SLT closed form from the measured costs) | online (maximises measured tokens/s). [default: fixed]")]
Acceptance = Annotated[Optional[str], typer.Option(
    help="Acceptance policy: exact (lossless, the default) | importance | typical | fly (LOSSY: faster, "
         "output no longer distributed as the target's; chains only).")]
Verification = Annotated[Optional[str], typer.Option(
    help="Where verification runs: target (the edge, against the q rows sent up) | split (DSSD: only q(x) "
         "per drafted token goes up, the edge sends p down at a rejection, the device draws the "
         "correction; lossless; chains only). [default: target]")]
PolicyOption = Annotated[Optional[list[str]], typer.Option(
    "--option", help="A policy knob KEY=VALUE, repeatable (e.g. importance_strength=0.5, typical_eps=0.09).")]
Temperature = Annotated[Optional[float], typer.Option(help="0 = greedy. [default: 0]")]
TopP = Annotated[Optional[float], typer.Option(help="Nucleus sampling mass in (0, 1].")]
Sparsifier = Annotated[Optional[str], typer.Option(help="Uplink q truncation: top-k | top-p | dense.")]
SparseK = Annotated[Optional[int], typer.Option(help="Entries per drafted position for top-k. [default: 16]")]
MaxNewTokens = Annotated[Optional[int], typer.Option(help="Tokens to generate. [default: 128]")]
Seed = Annotated[Optional[int], typer.Option(help="Seed of every random draw.")]
Dtype = Annotated[Optional[str], typer.Option(
    help="auto | bfloat16 | float32 | float16. [default: auto: bf16 only where the CPU computes in it]")]
Weights = Annotated[Optional[str], typer.Option(
    help="Target stages' weight format: auto (per layer shape, the fastest at the rows a stage runs, "
         "measured at load) | int8 (int8 weights, activations quantised per row) | int4 (weight-only, "
         "groups of 32) | dense (the model dtype). [default: auto]")]
DraftWeights = Annotated[Optional[str], typer.Option(
    help="The draft's weight format, same choices (any is lossless: the target checks the q sampled). "
         "[default: auto]")]
Threads = Annotated[Optional[int], typer.Option(help="Torch threads per worker. [default: one per core its node owns]")]
BatchSessions = Annotated[Optional[int], typer.Option(
    help="Most concurrent sessions a target stage verifies in one forward (1 = off). [default: 16]")]
Lockstep = Annotated[Optional[bool], typer.Option(
    "--lockstep/--no-lockstep",
    help="Concurrent sessions start their rounds together, so batched forwards serve them all "
         "(with --batch-sessions > 1). [default: on]")]
CacheDir = Annotated[Optional[str], typer.Option(help="Model cache. [default: $SPECMESH_CACHE or the user cache dir]")]


def _value(text: str):
    """A knob's value: bool, int, float or the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def policy_options(items: Optional[list[str]]) -> dict:
    """``["k=v", ...]`` -> ``{k: v}``; BadParameter naming the item otherwise."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--option {item!r}: must be KEY=VALUE, e.g. importance_strength=0.5")
        out[key.strip()] = _value(value.strip())
    return out


def make_config(topology: Optional[Path], target: Optional[str], draft: Optional[str], no_draft: bool,
                options: Optional[list[str]] = None, **kw) -> SpecConfig:
    """The config the options describe (None = the default); BadParameter naming a bad value."""
    kw = {k: v for k, v in kw.items() if v is not None}
    if options:
        kw["policy_options"] = policy_options(options)
    if target is not None:
        kw["target"] = target
    if no_draft:
        kw["draft"] = None
    elif draft is not None:
        kw["draft"] = draft
    try:
        if topology is None:
            return SpecConfig(**kw)
        from .inproc import config_from_topology

        cfg = config_from_topology(str(topology), **kw)
        check_threads(load_topology(topology), cfg.threads)  # no actor runs more threads than its cores
        return cfg
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from None


# (parameter, its option type, default): the engine options of every command that builds one.
ENGINE_OPTIONS = (
    ("topology", Topology, None), ("backend", Backend, "inproc"), ("target", Target, None),
    ("draft", Draft, None), ("no_draft", NoDraft, False), ("stages", Stages, None), ("gamma", Gamma, None),
    ("tree_width", TreeWidth, None), ("draft_length", DraftLength, None), ("acceptance", Acceptance, None),
    ("verification", Verification, None),
    ("option", PolicyOption, None), ("temperature", Temperature, None), ("top_p", TopP, None),
    ("sparsifier", Sparsifier, None), ("sparse_k", SparseK, None), ("max_new_tokens", MaxNewTokens, None),
    ("seed", Seed, None), ("dtype", Dtype, None), ("weights", Weights, None),
    ("draft_weights", DraftWeights, None),
    ("threads", Threads, None), ("cache_dir", CacheDir, None), ("batch_sessions", BatchSessions, None),
    ("lockstep", Lockstep, None),
)
# Option name -> SpecConfig field, where they differ.
_FIELD = {"stages": "num_stages"}


def with_engine_options(command: Callable) -> Callable:
    """Gives a typer command every engine option; the command receives them as ``cfg``, a
    :class:`SpecConfig`, and declares only its own options."""
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "cfg"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
              for name, kind, default in ENGINE_OPTIONS]

    @functools.wraps(command)
    def wrapper(**kw):
        values = {name: kw.pop(name) for name, _, _ in ENGINE_OPTIONS}
        fixed = {k: values.pop(k) for k in ("topology", "target", "draft", "no_draft", "option")}
        cfg = make_config(fixed["topology"], fixed["target"], fixed["draft"], fixed["no_draft"],
                          fixed["option"], **{_FIELD.get(k, k): v for k, v in values.items()})
        return command(cfg=cfg, **kw)

    wrapper.__signature__ = inspect.Signature(own + shared)
    return wrapper
