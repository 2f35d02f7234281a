"""The in-process backend: draft and target stages as plain objects in one process.

Every message still crosses the wire codec (encoded, counted, optionally delayed by the link model,
decoded), so the bytes reported in-process are the bytes a distributed run sends, and every run
exercises the codec.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch


from specmesh.actors import hf, lowbit, memory
from specmesh.actors.batched_draft import make_draft_worker
from specmesh.actors.cheap_draft import make_cheaper
from specmesh.actors.draft import DraftWorker
from specmesh.actors.models import resolve
from specmesh.actors.stage import TargetStage
from specmesh.runtime import codec
from specmesh.runtime.batching import MicroBatcher
from specmesh.runtime.config import SpecConfig
from specmesh.runtime.interfaces import Backend, ModelInfo
from specmesh.runtime.messages import OpenSession, ProposeRequest, VerifyResult
from specmesh.runtime.traffic import DOWNLINK, UPLINK, TrafficMeter

from . import federated_plan, links
from .topology import Topology, load_topology, single_machine


def topology_for(config: SpecConfig) -> Topology:
    """The configured topology file, or one machine with ideal links and ``num_stages`` stages.

    The file places the stages; the config names the models (``config_from_topology`` copies the
    file's models into a config).
    """
    if not config.topology:
        return single_machine(config.num_stages, 0.0, float("inf"), config.draft, config.target)
    topology = load_topology(config.topology)
    if topology.num_stages != config.num_stages:
        raise ValueError(
            f"num_stages {config.num_stages} disagrees with the {topology.num_stages} stages of "
            f"topology {config.topology}"
        )
    return topology


# Keys of a topology's [policies] table that are SpecConfig fields; the others are policy knobs.
POLICY_FIELDS = ("acceptance", "draft_length", "sparsifier", "sparse_k", "sparse_mass", "gamma", "tree_width",
                 "verification")


def config_from_topology(path: str, **overrides) -> SpecConfig:
    """A config whose models, stage count and policies come from the topology file at ``path``
    (``overrides``, e.g. command-line options, win over the file)."""
    topology = load_topology(path)
    base = dict(target=topology.models.target, draft=topology.models.draft,
                num_stages=topology.num_stages, topology=str(path))
    base.update({k: getattr(topology.models, k) for k in ("weights", "draft_weights")
                 if getattr(topology.models, k) is not None})
    base.update(federated_plan.config_fields(path, topology.models.target))  # SpecFed's [federated]
    fields = {k: v for k, v in topology.policies.items() if k in POLICY_FIELDS}
    knobs = {k: v for k, v in topology.policies.items() if k not in POLICY_FIELDS}
    if knobs:
        base["policy_options"] = {**knobs, **overrides.pop("policy_options", {})}
    try:
        return SpecConfig(**{**base, **fields, **overrides})
    except (ValueError, TypeError) as exc:
        if not topology.policies:
            raise
        raise type(exc)(f"{path} [policies] or options: {exc}") from None


def model_info(target_dir, num_layers: int, tokenizer) -> ModelInfo:
    """Vocabulary, context length and end-of-sequence ids of the target in ``target_dir`` (whose
    ``tokenizer``, already loaded, or None, names its end-of-document token)."""
    cfg = hf.load_config(target_dir)
    eos = cfg.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    gen_eos = hf.generation_eos(target_dir) + hf.document_end_ids(tokenizer)
    return ModelInfo(
        vocab_size=int(cfg.vocab_size), max_positions=int(cfg.max_position_embeddings),
        num_layers=num_layers, eos_token_ids=tuple(dict.fromkeys(eos_ids + gen_eos)),
    )


@dataclass
class _Hop:
    """One directed link of the round: its name for byte accounting and its (emulated) spec."""

    name: str
    spec: links.LinkSpec
    direction: str


class _Wire:
    """Encodes, counts, delays and decodes a message crossing one hop."""

    def __init__(self, traffic: TrafficMeter, vocab_size: int) -> None:
        self.traffic = traffic
        self.vocab_size = vocab_size

    def cross(self, hop: _Hop, msg):
        t0 = time.perf_counter()
        data = codec.encode(msg)
        t1 = time.perf_counter()
        delay_s = links.sleep_for(hop.spec, len(data))
        t2 = time.perf_counter()
        out = codec.decode(data, vocab_size=self.vocab_size)
        codec_ms = ((t1 - t0) + (time.perf_counter() - t2)) * 1e3
        session = getattr(msg, "proposal", msg).session_id
        self.traffic.record(hop.name, hop.direction, len(data), session, delay_s * 1e3, codec_ms)
        return out


class _Released:
    """Stands in for a worker after the backend's close: every use says so (the models are freed)."""

    def __getattr__(self, name: str):
        raise RuntimeError(f"this engine is closed (its models were released): cannot call {name}")


def release(drafter: "InprocDrafter | None", target: "InprocTarget") -> None:
    """Drops the models of an in-process backend, so that their memory is freed even while the
    engine object lives on (a benchmark that builds the next engine before dropping the last one's
    name held both: two float32 copies of the bundled pair do not fit in 24 GB)."""
    target.stages = [_Released()] * len(target.stages)
    target.batchers = None
    if drafter is not None:
        drafter.worker = _Released()


class InprocDrafter:
    def __init__(self, worker: DraftWorker) -> None:
        self.worker = worker

    def open(self, msg: OpenSession) -> None:
        self.worker.open(msg)

    def close(self, session_id: str) -> dict[str, int]:
        return self.worker.close(session_id)

    def propose(self, req: ProposeRequest):
        return self.worker.propose(req)

    def speculate(self, session_id: str, gamma: int, width: int, budget_ms: float | None) -> None:
        self.worker.speculate(session_id, gamma, width, budget_ms)

    def resolve(self, verdict: VerifyResult) -> int:
        return self.worker.resolve(verdict)  # the verdict already crossed the codec (downlink hop)

    def recover(self) -> bool:
        return False  # a worker in this process cannot die apart from it


class InprocTarget:
    """The target stages in this process.

    Args:
        batch_sessions: most concurrent sessions (threads calling :meth:`verify`) whose rounds one
            stage runs in one forward (``TargetStage.step_many``); 1 = off: every thread steps the
            stage itself, as before batching existed.
    """

    def __init__(self, stages: list[TargetStage], hops: list[_Hop], wire: _Wire,
                 batch_sessions: int = 1) -> None:
        self.stages = stages
        self.hops = hops  # device->stage0, stage0->stage1, ..., last->device
        self.wire = wire
        self.batchers = [MicroBatcher(s.step_many, batch_sessions) for s in stages] if batch_sessions > 1 else None

    def batch_stats(self) -> list[dict[int, int]]:
        """Per stage, how many forwards ran of each batch size (``{sessions: count}``); empty when off."""
        return [b.stats() for b in self.batchers] if self.batchers else []

    def next_logits(self, ids: list[int]) -> torch.Tensor:
        """The target's float32 logits ``[V]`` for the token after ``ids``, from one forward over all
        of them through every stage in fresh caches: the target as it runs (its weight formats),
        the reference for where two greedy decodes part at a near tie."""
        x = torch.tensor(list(ids), dtype=torch.int64)  # [n]
        positions = torch.arange(len(ids))
        for stage in self.stages:
            model = stage.model
            x = hf.forward(model, model.new_cache(), input_ids=x, position_ids=positions) if model.is_first \
                else hf.forward(model, model.new_cache(), hidden=x, position_ids=positions)  # [n, H]
        return hf.lm_head(self.stages[-1].model, x[-1:])[0]

    def open(self, msg: OpenSession) -> None:
        for s in self.stages:
            s.open(msg)

    def close(self, session_id: str) -> None:
        for s in self.stages:
            s.close(session_id)
        for b in self.batchers or ():
            b.forget(session_id)

    def recover(self, role: str) -> bool:
        return False  # a worker in this process cannot die apart from it

    def verify(self, proposal) -> VerifyResult:
        msg = proposal
        for i, (hop, stage) in enumerate(zip(self.hops, self.stages)):
            msg = self.wire.cross(hop, msg)  # each session's message crosses its own link
            msg = stage.step(msg) if self.batchers is None else self.batchers[i].submit(msg, proposal.session_id)
        return self.wire.cross(self.hops[-1], msg)


def load_drafter(config: SpecConfig, target_dir, vocab_size: int) -> InprocDrafter | None:
    """The configured draft in this process (None for target-only), checked against the target's
    vocabulary and tokenizer; batched across sessions where it can be (``make_draft_worker``)."""
    if config.draft is None:
        return None
    draft_dir = resolve(config.draft, config.cache_dir)
    dtype = hf.resolve_dtype(config.dtype, config.draft_weights)
    draft = make_cheaper(hf.load_stage(draft_dir, dtype=lowbit.load_dtype(dtype, config.draft_weights)),
                         config.draft_weights, config.draft_head_rows, dtype)
    check_vocab(draft.vocab_size, vocab_size, config)
    if hf.has_tokenizer(draft_dir) and hf.has_tokenizer(target_dir):
        from specmesh.actors.tokenizer_check import check_same_tokenizer

        check_same_tokenizer(draft_dir, target_dir)
    return InprocDrafter(make_draft_worker(draft, config.threads, config.batch_sessions))


def round_hops(topology: Topology) -> list[_Hop]:
    """The hops of a round, named ``src->dst`` for accounting: away from the device is uplink
    (device -> stage 0 -> ... -> last stage), the verdict's way back is downlink."""
    hops = topology.round_hops()
    return [
        _Hop(f"{src}->{dst}", topology.link(src, dst), DOWNLINK if i == len(hops) - 1 else UPLINK)
        for i, (src, dst) in enumerate(hops)
    ]


def build(config: SpecConfig) -> Backend:
    """Loads the draft and the target stages in this process and wires them."""
    topology = topology_for(config)
    dtype = hf.resolve_dtype(config.dtype, config.weights)
    target_dir = resolve(config.target, config.cache_dir)
    total = hf.num_layers(hf.load_config(target_dir))
    split = topology.split_layers(total)
    tokenizer = hf.load_tokenizer(target_dir)
    info = model_info(target_dir, total, tokenizer)
    vocab = lambda: hf.vocab_strings(tokenizer, info.vocab_size)  # noqa: E731 (decoded on demand)
    stored = lowbit.load_dtype(dtype, config.weights)
    stages = [TargetStage(hf.load_stage(target_dir, r, dtype=stored), config.threads, vocab, config.weights, dtype)
              for r in split]
    drafter = load_drafter(config, target_dir, info.vocab_size)
    traffic = TrafficMeter()
    hops = [
        _Hop(h.name, links.emulated(h.spec, topology.emulate, real_network=False), h.direction)
        for h in round_hops(topology)
    ]
    target = InprocTarget(stages, hops, _Wire(traffic, info.vocab_size), config.batch_sessions)
    backend = Backend(drafter, target, info, tokenizer, traffic, device_links=(hops[0].name, hops[-1].name),
                      num_stages=len(stages), close=lambda: release(drafter, target))
    backend.workers = in_process_workers(stages, drafter)
    return backend


def in_process_workers(stages: list[TargetStage], drafter: InprocDrafter | None) -> list[dict]:
    """Where each worker runs and in which weight formats, as the Ray backends report it; the
    resident memory is the process's (every worker shares it), measured once all are loaded."""
    mem = {"pid": os.getpid(), "rss_bytes": memory.resident_bytes(), "peak_rss_bytes": memory.peak_resident_bytes()}
    out = [{"role": f"stage{i}", "layers": list(s.model.layers), "formats": s.model.formats, **mem}
           for i, s in enumerate(stages)]
    if drafter is not None:
        out.append({"role": "draft", "formats": drafter.worker.model.formats, **mem})
    return out


def check_vocab(draft_vocab: int, target_vocab: int, config: SpecConfig) -> None:
    if draft_vocab != target_vocab:
        raise ValueError(
            f"draft {config.draft!r} has a vocabulary of {draft_vocab} tokens but target "
            f"{config.target!r} has {target_vocab}: speculative decoding needs the same vocabulary"
        )
