"""The scenarios of ``specmesh bench`` (``quality`` and ``lengths`` live in their own modules); each
takes a :class:`~.runner.Bench` and returns its section of ``results.json`` (raw runs, spreads, the
links and config it ran under)."""
from __future__ import annotations

import gc
from typing import Callable

import torch

from specmesh.actors.models import resolve
from specmesh.cluster.compare import BASELINE, WARMUP_TOKENS, Variant, run_side_by_side

from .lengths import scenario_lengths
from .quality import scenario_quality
from .runner import Bench, config_dict, decoder, run_record, stat

SPECMESH = Variant("specmesh", {})  # the engine's configuration as built: gamma 4, top-k 16, exact
PEER_VARIANTS = (("hf-greedy", False), ("hf-assisted", True))  # transformers' generate: (label, assisted)


def scenario_latency(b: Bench) -> dict:
    """Speedup over target-only pipelined decoding vs per-hop latency, per stage count."""
    prompts, points = b.prompts("latency"), []
    for n in b.grid.stage_counts:
        for lat in b.grid.latencies_ms:
            engine, topo, path = b.engine(n, lat)
            m = b.measure(f"latency: {n} stage(s), {lat:g} ms/hop", engine, prompts, [BASELINE, SPECMESH],
                          common={"max_new_tokens": b.tokens("latency")})
            s = m["summary"][SPECMESH.label]["speedup"]
            b.console.print(f"  latency {n} stage(s) {lat:>5g} ms: speedup {s['mean']:.2f}x")
            points.append({"num_stages": n, "latency_ms": lat, "links": topo.describe_links(),
                           "topology_file": str(path), "config": config_dict(engine), **m})
    return {"prompts": [p for p, _ in prompts], "max_new_tokens": b.tokens("latency"),
            "bandwidth_mbps": b.options.bandwidth_mbps, "points": points}


def scenario_gamma(b: Bench) -> dict:
    """Mean accepted length and speedup vs gamma, per draft-length policy, over a fixed pipeline."""
    engine, topo, _ = b.engine(b.grid.gamma_stages, b.grid.gamma_latency_ms)
    variants = [BASELINE] + [Variant(f"{policy} gamma={g}", {"gamma": g, "draft_length": policy})
                             for policy in b.grid.draft_lengths for g in b.grid.gammas]
    prompts = b.prompts("gamma")
    m = b.measure("gamma", engine, prompts, variants, common={"max_new_tokens": b.tokens("gamma")})
    return {"prompts": [p for p, _ in prompts], "max_new_tokens": b.tokens("gamma"),
            "links": topo.describe_links(), "num_stages": topo.num_stages, "config": config_dict(engine), **m}


def scenario_sparsifier(b: Bench) -> dict:
    """Uplink bytes per token and acceptance vs sparsifier, sampling at ``--temperature``."""
    engine, topo, _ = b.engine(1, 0.0)
    vocab = engine.backend.info.vocab_size
    variants = [BASELINE, Variant("dense", {"sparsifier": "dense"})]
    variants += [Variant(f"top-k {k}", {"sparsifier": "top-k", "sparse_k": k}) for k in b.grid.sparse_ks]
    # top-p uncapped: sparse_k (its cap) set to the whole vocabulary
    variants += [Variant(f"top-p {p:g}", {"sparsifier": "top-p", "sparse_mass": p, "sparse_k": vocab})
                 for p in b.grid.sparse_masses]
    prompts = b.prompts("sparsifier")
    m = b.measure("sparsifier", engine, prompts, variants,
                  common={"max_new_tokens": b.tokens("sparsifier"),
                          "temperature": b.options.temperature_of("sparsifier")})
    dense = [next(s for s in rep if s["variant"] == "dense") for rep in m["per_repeat"]]
    for v in variants[1:]:
        reps = [next(s for s in rep if s["variant"] == v.label) for rep in m["per_repeat"]]
        m["summary"][v.label]["uplink_saving_vs_dense"] = stat(
            [d["bytes_up_per_token"] / s["bytes_up_per_token"] if s["bytes_up_per_token"] else None
             for d, s in zip(dense, reps)])
    return {"prompts": [p for p, _ in prompts], "max_new_tokens": b.tokens("sparsifier"),
            "temperature": b.options.temperature_of("sparsifier"), "links": topo.describe_links(),
            "vocab_size": vocab,
            "config": config_dict(engine), **m}


def scenario_hf(b: Bench) -> dict:
    """SpecMesh (1 stage, no link) against transformers: greedy and assisted generation."""
    from .hf_assisted import NEAR_TIE_LOGITS, AssistedPeer

    engine, topo, _ = b.engine(1, 0.0)
    cfg = engine.config
    torch.set_num_threads(b.threads)
    with b.console.status("loading the transformers peer"):
        peer = AssistedPeer(resolve(cfg.target, cfg.cache_dir), resolve(cfg.draft, cfg.cache_dir), cfg.dtype,
                            engine.backend.info.eos_token_ids)
    prompts, n_tokens, decode = b.prompts("hf"), b.tokens("hf"), decoder(engine)
    peers = [(label, lambda ids, n, a=assisted: peer.generate(ids, n, assisted=a)) for label, assisted in PEER_VARIANTS]
    rows = _beside_peers(b, "hf", engine, prompts, n_tokens, peers)
    identity = [_identity(peer, pid, _ids(engine, prompt), rows, decode) for pid, prompt in prompts]
    settings = peer.settings()
    del peer
    gc.collect()
    return {"prompts": [p for p, _ in prompts], "max_new_tokens": n_tokens, "links": topo.describe_links(),
            "threads": b.threads, "assistant_settings": settings, "near_tie_logits": NEAR_TIE_LOGITS,
            "config": config_dict(engine), "repeats": b.repeats, "runs": rows,
            "summary": hf_summary(rows, b.repeats), "identity": identity}


def scenario_llamacpp(b: Bench) -> dict:
    """SpecMesh (1 stage, no link; target-only and speculative) beside llama.cpp's plain greedy
    decoding of the bundled target's own GGUF: same prompts, tokens and threads, in one run."""
    from specmesh.actors.model_store import pull_gguf

    from .llamacpp import INSTALL_HINT, LlamaCppPeer, available

    if b.options.models != "bundled":
        return {"skipped": "llama.cpp runs the bundled target's GGUF: use --models bundled"}
    if not available():
        b.console.print(f"  llamacpp skipped: {INSTALL_HINT}")
        return {"skipped": INSTALL_HINT}
    engine, topo, _ = b.engine(1, 0.0)
    cfg = engine.config
    torch.set_num_threads(b.threads)
    gguf = pull_gguf(cfg.target, cfg.cache_dir)
    with b.console.status("loading llama.cpp"):
        peer = LlamaCppPeer(gguf, b.threads)
    prompts, n_tokens, decode = b.prompts("llamacpp"), b.tokens("llamacpp"), decoder(engine)
    eos = engine.backend.info.eos_token_ids
    rows = _beside_peers(b, "llamacpp", engine, prompts, n_tokens, [(LLAMACPP, lambda ids, n: peer.generate(ids, n, eos))])
    del peer
    gc.collect()
    from .hf_assisted import compare_outputs

    first = {(r["prompt_id"], r["variant"]): r["output_ids"] for r in rows if r["repeat"] == 0}
    target = engine.backend.target  # in process: its next_logits is the target as it runs
    same = {pid: compare_outputs(target, _ids(engine, prompt), first[pid, SPECMESH.label], first[pid, BASELINE.label],
                                 decode) for pid, prompt in prompts}
    return {"prompts": [p for p, _ in prompts], "max_new_tokens": n_tokens, "links": topo.describe_links(),
            "threads": b.threads, "gguf": gguf.name, "config": config_dict(engine), "repeats": b.repeats,
            "runs": rows, "summary": hf_summary(rows, b.repeats, LLAMACPP_PAIRS),
            "specmesh_equals_target_only": same, "workers": engine.backend.workers}


LLAMACPP = "llama.cpp"
# The llamacpp scenario's ratios: SpecMesh and its target-only decoding against the anchor, and its own speedup.
LLAMACPP_PAIRS = (("specmesh", LLAMACPP), ("target-only", LLAMACPP), ("specmesh", "target-only"))


def _beside_peers(b: Bench, label: str, engine, prompts, n_tokens: int, peers) -> list[dict]:
    """Per repetition and prompt: target-only and SpecMesh on ``engine``, then each peer
    (``(variant, generate(ids, max_new_tokens) -> PeerRun)``) on the same token ids, interleaved;
    the first prompt warms every one up untimed. Returns one row per run."""
    decode = decoder(engine)
    variants = [Variant(v.label, {**v.overrides, "max_new_tokens": n_tokens, "seed": b.options.seed})
                for v in (BASELINE, SPECMESH)]
    per_prompt = len(variants) + len(peers)  # runs of one prompt in one repetition
    task = b.progress.add_task(label, total=b.repeats * len(prompts) * per_prompt)
    rows: list[dict] = []
    for r in range(b.repeats):
        for i, (pid, prompt) in enumerate(prompts):
            first = r == 0 and i == 0
            runs = run_side_by_side(engine, [(pid, prompt)], variants, warmup=first,
                                    on_run=lambda _run: b.progress.advance(task))
            rows += [run_record(run, r, decode) for run in runs]
            ids = _ids(engine, prompt)
            for variant, generate in peers:
                if first:  # the peer's own warm-up, untimed
                    generate(ids, WARMUP_TOKENS)
                got = generate(ids, n_tokens)
                rows.append({"prompt_id": pid, "variant": variant, "repeat": r, "prompt_tokens": len(ids),
                             "tokens": len(got.output_ids), "wall_s": got.wall_s,
                             "tokens_per_s": got.tokens_per_s, "output_ids": got.output_ids,
                             **({"text": decode(got.output_ids)} if decode else {})})
                b.progress.advance(task)
            if b.checkpoint is not None:
                b.checkpoint(f"{label} {pid} repeat {r}", {"runs": rows[-per_prompt:]})
    b.progress.remove_task(task)
    return rows


def _ids(engine, prompt) -> list[int]:
    return list(engine.tokenizer.encode(prompt)) if isinstance(prompt, str) else list(prompt)


def _identity(peer, prompt_id: str, ids: list[int], rows: list[dict], decode) -> dict:
    """Whether every variant repeated itself, and how the first repetition's outputs compare."""
    from .hf_assisted import compare_outputs

    outs = {}
    for row in rows:
        if row["prompt_id"] == prompt_id:
            outs.setdefault(row["variant"], []).append(row["output_ids"])
    entry = {"prompt_id": prompt_id, "deterministic": {v: all(o == got[0] for o in got) for v, got in outs.items()}}
    for a, c in HF_PAIRS:
        entry[f"{a} vs {c}"] = compare_outputs(peer, ids, outs[a][0], outs[c][0], decode)
    return entry


# Pairs of the hf scenario, compared for tokens/s (a / b) and for identical outputs: SpecMesh's own
# speedup, the peer's own, head to head, and the two target-only decoders.
HF_PAIRS = (("specmesh", "target-only"), ("hf-assisted", "hf-greedy"), ("specmesh", "hf-assisted"),
            ("target-only", "hf-greedy"))


def tokens_per_s(rows: list[dict], variant: str, repeat: int, prompt_id: str | None = None) -> float:
    """Token-weighted throughput of ``variant`` in one repetition (over all prompts, or one)."""
    sel = [r for r in rows if r["variant"] == variant and r["repeat"] == repeat
           and (prompt_id is None or r["prompt_id"] == prompt_id)]
    wall = sum(r["wall_s"] for r in sel)
    return sum(r["tokens"] for r in sel) / wall if wall else float("nan")


def hf_summary(rows: list[dict], repeats: int, pairs=HF_PAIRS) -> dict:
    """Tokens/s per variant and the ``pairs`` ratios, overall and per prompt, as :func:`stat`."""
    prompt_ids = list(dict.fromkeys(r["prompt_id"] for r in rows))
    out: dict = {}
    for scope in [None, *prompt_ids]:
        tps = {v: [tokens_per_s(rows, v, r, scope) for r in range(repeats)]
               for v in dict.fromkeys(r["variant"] for r in rows)}
        entry = {f"tokens_per_s {v}": stat(vals) for v, vals in tps.items()}
        for a, c in pairs:
            entry[f"{a} / {c}"] = stat([x / y for x, y in zip(tps[a], tps[c])])
        out["all" if scope is None else scope] = entry
    return out


SCENARIO_FUNCS: dict[str, Callable[[Bench], dict]] = {
    "latency": scenario_latency, "gamma": scenario_gamma, "sparsifier": scenario_sparsifier,
    "hf": scenario_hf, "quality": scenario_quality, "lengths": scenario_lengths, "llamacpp": scenario_llamacpp,
}
