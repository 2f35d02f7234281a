"""Failure figures on an emulated 3-host cluster (``specmesh emulate``; needs root and iproute2).

On cluster/examples/tiny_failover.toml (device, edge1, edge2; the edge servers stand in for each
other), with a driver on the head host, one run measures:
  * ``emulate up`` and ``down`` times;
  * a killed stage actor and a killed node (edge2), each while a round is in flight: time from the
    kill to detection (the scheduler asks for a replacement), to replace, and from the kill until the
    next tokens arrive; whether the output equals the undisturbed one, every token streamed once;
  * 16 sessions held at once: open sessions and resident memory of every worker before, at peak, after;
  * the DSD latency scenario: target-only beside SpecMesh (chain, top-K, overlap) at the topology's
    link latency, on the emulated hosts and in ``local`` mode (Ray on this machine, links modelled).

    python -m specmesh.benchmarks.failures                  # tiny models, a few minutes
    python -m specmesh.benchmarks.failures --models bundled # the bundled Qwen pair (slow on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from specmesh.cluster import emulate, emulate_ops, netns
from specmesh.cluster.compare import BASELINE, Variant, run_side_by_side, summarise
from specmesh.cluster.rehearsal import HEALTH_ENV, Rehearsal
from specmesh.cluster.topology import example_path
from specmesh.runtime.config import DEFAULT_DRAFT, DEFAULT_TARGET, SpecConfig

from .dsd import TINY_PROMPTS

PREFIX = "smxb-"
TOPOLOGY = "tiny_failover"
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 128, 64]
SPECMESH = Variant("specmesh chain, top-K, overlap", {"sparsifier": "top-k", "overlap": True, "tree_width": 1})
MODELS = {"tiny": ("tiny:layers=4", "tiny-draft", "float32"), "bundled": (DEFAULT_TARGET, DEFAULT_DRAFT, "auto")}


def _config(args: argparse.Namespace, cache: str) -> dict:
    target, draft, dtype = MODELS[args.models]
    return dict(target=target, draft=draft, dtype=dtype, threads=1, cache_dir=cache, max_new_tokens=args.max_new_tokens,
                timeout_s=args.timeout, hop_timeout_s=args.hop_timeout)


def _disturbed(driver: Rehearsal, name: str, disturb, kw: dict, reference: list[int]) -> dict:
    """One generation with ``disturb`` done while its third round is in flight; times from then."""
    answer, streamed = driver.generate(PROMPT, kw, pause_after=2, disturb=disturb, during=True)
    first, t0 = (answer.get("recoveries") or [{}])[0], answer["disturbed_t"]
    after = [t - t0 for t in answer["token_t"] if "asked_t" in first and t > first["asked_t"]]
    return {"failure": name, "outcome": answer["event"], "same_output": answer.get("output_ids") == reference,
            "streamed_once": sum(streamed, []) == answer.get("output_ids"), "role": first.get("role"),
            "detect_s": first["asked_t"] - t0 if "asked_t" in first else None,
            "replace_s": first["answered_s"] - first["asked_s"] if "answered_s" in first else None,
            "next_tokens_s": after[0] if after else None}


def _emulated(args: argparse.Namespace, cache: str, out: dict) -> None:
    t0 = time.monotonic()
    state = emulate.up(example_path(TOPOLOGY), prefix=PREFIX, env={**os.environ, **HEALTH_ENV})
    out["up_s"] = time.monotonic() - t0
    try:
        driver = Rehearsal(state, _config(args, cache), timeout_s=max(600.0, args.timeout * 4))
        try:
            out["build_s"] = driver.ready["build_s"]
            prompts = [[pid, ids] for pid, ids in TINY_PROMPTS]
            out["dsd_emulated"] = driver.ask("dsd", prompts=prompts, variants=[vars(SPECMESH)])["summary"]
            kw = dict(temperature=1.0, seed=5)
            reference, _ = driver.generate(PROMPT, kw)
            out["undisturbed_s"] = reference["total_s"]
            workers = {w["role"]: w for w in driver.ask("workers")["workers"]}
            out["failures"] = [
                _disturbed(driver, "stage actor killed (stage0, SIGKILL)",
                           lambda: os.kill(workers["stage0"]["pid"], signal.SIGKILL), kw, reference["output_ids"]),
                _disturbed(driver, "node killed (edge2: stage1 moves to edge1)",
                           lambda: emulate_ops.kill(state, "edge2"), kw, reference["output_ids"]),
            ]
            out["load"] = driver.ask("load", sessions=args.sessions, kw=dict(temperature=1.0))
        finally:
            driver.close()
    finally:
        t0 = time.monotonic()
        emulate.down(PREFIX)
        out["down_s"] = time.monotonic() - t0


def _local(args: argparse.Namespace, cache: str) -> list[dict]:
    from specmesh.runtime.api import SpecMesh

    cfg = SpecConfig(**_config(args, cache), backend="local", topology=str(example_path(TOPOLOGY)))
    with SpecMesh(cfg) as engine:
        runs = run_side_by_side(engine, TINY_PROMPTS, [BASELINE, SPECMESH])
    return [s.__dict__ for s in summarise(runs)]


def _print(out: dict) -> None:
    mib = lambda kb: f"{kb / 1024:.0f}"  # noqa: E731
    print(f"\nemulate up {out['up_s']:.1f} s, engine build {out['build_s']:.1f} s, down {out['down_s']:.1f} s; "
          f"undisturbed generation {out['undisturbed_s']:.2f} s")
    print(f"{'failure':<44} {'outcome':<7} {'same':<5} {'detect s':>8} {'replace s':>9} {'next tokens s':>13}")
    for f in out["failures"]:
        cells = [f"{f[k]:.2f}" if isinstance(f[k], float) else "-" for k in ("detect_s", "replace_s", "next_tokens_s")]
        print(f"{f['failure']:<44} {f['outcome']:<7} {str(f['same_output'] and f['streamed_once']):<5} "
              f"{cells[0]:>8} {cells[1]:>9} {cells[2]:>13}")
    load = out["load"]
    print(f"\n{len(load['held'])} workers, {load['tokens']} tokens of 16 sessions in {load['s']:.1f} s")
    print(f"{'worker':<8} {'sessions held':>13} {'RSS before MiB':>14} {'peak MiB':>9} {'after MiB':>9} {'open after':>10}")
    for role, held in load["held"].items():
        print(f"{role:<8} {held:>13} {mib(load['rss_base_kb'][role]):>14} {mib(load['rss_peak_kb'][role]):>9} "
              f"{mib(load['rss_after_kb'][role]):>9} {load['open_after'][role]:>10}")
    print("\nDSD latency scenario (tiny_failover.toml links), tokens/s")
    print(f"{'mode':<10} {'variant':<32} {'tok/s':>7} {'decode tok/s':>12} {'speedup':>8} {'same output':>11}")
    for mode in ("emulated", "local"):
        for s in out[f"dsd_{mode}"]:
            print(f"{mode:<10} {s['variant']:<32} {s['tokens_per_s']:>7.2f} {s['decode_tokens_per_s']:>12.2f} "
                  f"{s['speedup']:>7.2f}x {str(s['same_output_as_baseline']):>11}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m specmesh.benchmarks.failures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", choices=tuple(MODELS), default="tiny", help="model pair")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sessions", type=int, default=16, help="concurrent sessions of the load figure")
    p.add_argument("--timeout", type=float, default=60.0, help="round deadline, s (SpecConfig.timeout_s)")
    p.add_argument("--hop-timeout", type=float, default=10.0, help="per-hop deadline, s (hop_timeout_s)")
    p.add_argument("--json", type=Path, help="write every raw figure here")
    args = p.parse_args(argv)
    missing = netns.missing_requirement()
    if missing:
        sys.exit(f"specmesh.benchmarks.failures emulates hosts with network namespaces: {missing}")
    out: dict = {"config": vars(args) | {"json": str(args.json)}}
    with tempfile.TemporaryDirectory() as cache:
        _emulated(args, cache, out)
        out["dsd_local"] = _local(args, cache)
    _print(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
