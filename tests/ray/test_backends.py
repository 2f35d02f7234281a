"""Local Ray (every worker its own process) against the in-process backend, on tiny models in fp32.

Same tokens (greedy and seeded sampling), the same bytes on every link, modelled links that cost at
least what they model, bad messages answered with an error while the worker keeps serving, and a
dead or stuck worker reported by name within the deadline instead of a hang.
"""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

from specmesh.actors import hf
from specmesh.actors.models import resolve
from specmesh.cluster.inproc import config_from_topology
from specmesh.cluster.ray_backend import RemoteError
from specmesh.runtime import SpecConfig, SpecMesh, codec
from specmesh.runtime.messages import (
    DraftProposal, ErrorMessage, OpenSession, SamplingParams, StageFrame, VerifyResult,
)
from specmesh.runtime.sparse import SparseDist
from specmesh.runtime.traffic import DOWNLINK, UPLINK

from .conftest import actor_states, wait_dead

pytestmark = pytest.mark.ray

TARGET = "tiny"
DRAFT = "tiny-draft"  # the target's weights + noise: right about half the time
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 128, 64]
NEW_TOKENS = 24
STAGES = (1, 2, 3)
DEADLINE_S = 8.0  # the round deadline of the failure tests
# A failure's diagnosis and the cleanup of the other workers take well under a second on an idle
# machine and a few on a loaded one; a cleanup that waited on the stuck worker again would add a
# whole deadline. So "less than two deadlines" tells the two apart and holds under load.
GRACE_S = DEADLINE_S
LINK_MS = 30.0  # the modelled link of the link-model test: 30 ms, 2 Mbit/s
LINK_MBPS = 2.0


def _config(cache: str, **kw) -> SpecConfig:
    base = dict(target=TARGET, draft=DRAFT, dtype="float32", cache_dir=cache, threads=1,
                max_new_tokens=NEW_TOKENS)
    return SpecConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def engines(local_ray, model_cache):
    """(backend, stages) -> engine, for inproc and local Ray with 1, 2 and 3 stages."""
    keys = [(backend, n) for n in STAGES for backend in ("inproc", "local")]
    # Built side by side: the actor processes start together instead of one engine after another.
    with ThreadPoolExecutor(len(keys)) as pool:
        futures = {k: pool.submit(SpecMesh, _config(model_cache, backend=k[0], num_stages=k[1])) for k in keys}
    built = {k: f.result() for k, f in futures.items() if f.exception() is None}
    try:
        for f in futures.values():
            if f.exception() is not None:
                raise f.exception()
        yield built
    finally:
        for engine in built.values():
            engine.close()


def _links(snapshot) -> dict[tuple[str, str], tuple[int, int]]:
    return {(r["link"], r["direction"]): (r["bytes"], r["messages"]) for r in snapshot.as_rows()}


def _delta(before, after) -> dict[tuple[str, str], tuple[int, int]]:
    b, a = _links(before), _links(after)
    return {k: (v[0] - b.get(k, (0, 0))[0], v[1] - b.get(k, (0, 0))[1]) for k, v in a.items()
            if v != b.get(k, (0, 0))}


# ---------- same tokens as in process ----------

@pytest.mark.parametrize("stages", STAGES)
def test_greedy_output_equals_inproc_and_target_only(engines, stages):
    inproc, local = engines["inproc", stages], engines["local", stages]
    reference = inproc.generate(PROMPT, draft=None).output_ids
    assert local.generate(PROMPT, draft=None).output_ids == reference
    for kw in (dict(gamma=1), dict(gamma=4), dict(gamma=3, tree_width=2)):
        want, got = inproc.generate(PROMPT, **kw), local.generate(PROMPT, **kw)
        assert got.output_ids == reference, kw
        s, w = got.stats, want.stats
        assert 0 < s.accepted < s.drafted, "the noisy draft must be partly right and partly wrong"
        assert [r.accepted for r in s.records] == [r.accepted for r in w.records], kw
        # The device links carry deterministic frames: the same bytes to the byte.
        assert (s.bytes_up, s.bytes_down) == (w.bytes_up, w.bytes_down), kw
        # Frames between stages are zstd-compressed and carry each stage's compute time, so
        # their size may differ by a few bytes from run to run.
        assert s.bytes_between_stages == pytest.approx(w.bytes_between_stages, rel=0.01, abs=0), kw
        assert (s.bytes_between_stages > 0) == (stages > 1)


def test_seeded_sampling_equals_inproc(engines):
    inproc, local = engines["inproc", 2], engines["local", 2]
    for seed in (11, 12):
        want = inproc.generate(PROMPT, temperature=1.0, seed=seed)
        got = local.generate(PROMPT, temperature=1.0, seed=seed)
        assert got.output_ids == want.output_ids, f"seed {seed}"
        assert got.stats.accepted == want.stats.accepted > 0
    a = local.generate(PROMPT, temperature=1.0, seed=11).output_ids
    assert a != local.generate(PROMPT, temperature=1.0, seed=12).output_ids


def test_workers_are_separate_processes_with_one_thread(engines):
    workers = engines["local", 3].backend.workers
    assert [w["role"] for w in workers] == ["stage0", "stage1", "stage2", "draft"]
    assert len({w["pid"] for w in workers} | {os.getpid()}) == 5
    assert all(w["threads"] == 1 for w in workers)
    assert [w["layers"] for w in workers[:3]] == [[0, 1], [2], [3]]


# ---------- the link model and byte accounting ----------

def _encoded_round_sizes(session_id, rnd, rollback, context, token, hidden_size, stages, vocab):
    """Sizes of the frames of one target-only round, encoded here with the wire codec: the proposal
    (device -> stage 0), one frame per stage boundary, the verdict (last stage -> device)."""
    proposal = DraftProposal(session_id, rnd, rollback, context, torch.zeros(0, dtype=torch.int64),
                             SparseDist.empty(vocab))
    hidden = torch.zeros(len(context), hidden_size, dtype=torch.float32)
    frames = [len(codec.encode(StageFrame(proposal, hidden, [0.0] * (k + 1)))) for k in range(stages - 1)]
    verdict = VerifyResult(session_id, rnd, 0, [token], [], [], [0.0] * stages)
    return len(codec.encode(proposal)), frames, len(codec.encode(verdict))


@pytest.mark.parametrize("stages", [1, 3])
def test_byte_counts_per_link_match_the_encoded_messages(engines, model_cache, stages):
    """Target-only with a 2-token prompt: every frame stays below the compression threshold, so its
    size is fixed by its shape and the counts must equal the frames encoded here, byte for byte."""
    prompt, new = [3, 141], 5
    cfg = hf.load_config(resolve(TARGET, model_cache))
    results = {}
    for backend in ("inproc", "local"):
        engine = engines[backend, stages]
        before = engine.backend.traffic.snapshot()
        gen = engine.generation(prompt, session_id="bytes", draft=None, max_new_tokens=new)
        gen.run()
        results[backend] = gen, _delta(before, engine.backend.traffic.snapshot())
    gen, links = results["local"]
    assert links == results["inproc"][1]
    assert gen.output_ids == results["inproc"][0].output_ids
    up, between, down = 0, [0] * (stages - 1), 0
    committed = list(prompt)
    for rnd, token in enumerate(gen.output_ids, start=1):
        rollback = 0 if rnd == 1 else len(committed) - 1
        u, frames, d = _encoded_round_sizes("bytes", rnd, rollback, committed[rollback:], token,
                                            cfg.hidden_size, stages, cfg.vocab_size)
        assert u + sum(frames) + d < 3 * codec.DEFAULT_CONFIG.compress_threshold
        up, down = up + u, down + d
        between = [b + f for b, f in zip(between, frames)]
        committed.append(token)
    hosts = ["device"] + [f"edge{i + 1}" for i in range(stages)] + ["device"]
    names = [f"{a}->{b}" for a, b in zip(hosts[:-1], hosts[1:])]
    want = {(names[0], UPLINK): (up, new), (names[-1], DOWNLINK): (down, new)}
    want.update({(name, UPLINK): (b, new) for name, b in zip(names[1:-1], between)})
    assert links == want
    s = gen.stats
    assert (s.bytes_up, s.bytes_down, s.bytes_between_stages) == (up, down, sum(between))


def _modelled_s(links: dict) -> float:
    """``latency + bytes * 8 / bandwidth`` summed over every message counted on every link."""
    per_bit = 1 / (LINK_MBPS * 1e6)
    return sum(msgs * LINK_MS / 1e3 + nbytes * 8 * per_bit for nbytes, msgs in links.values())


def test_round_trip_takes_at_least_the_modelled_link_time(local_ray, model_cache, tmp_path):
    path = tmp_path / "slow.toml"
    path.write_text(f"""
        name = "two stages behind {LINK_MS:g} ms, {LINK_MBPS:g} Mbit/s links"
        stages = ["edge1", "edge2"]
        [models]
        target = "{TARGET}"
        [default_link]
        latency_ms = {LINK_MS}
        bandwidth_mbps = {LINK_MBPS}
    """ + "".join(f'[[nodes]]\nname = "{name}"\nrole = "{name.rstrip("12")}"\n'
                  for name in ("device", "edge1", "edge2")))
    cfg = config_from_topology(str(path), backend="local", dtype="float32", cache_dir=model_cache,
                               threads=1)
    with SpecMesh(cfg) as engine:
        engine.generate(PROMPT, max_new_tokens=2)  # warm-up
        for new in (1, 8):  # one round (the prompt's), then a whole generation
            before = engine.backend.traffic.snapshot()
            result = engine.generate(PROMPT, max_new_tokens=new)
            links = _delta(before, engine.backend.traffic.snapshot())
            assert sorted(links) == [("device->edge1", UPLINK), ("edge1->edge2", UPLINK),
                                     ("edge2->device", DOWNLINK)]
            assert all(msgs == new for _, msgs in links.values())
            modelled = _modelled_s(links)
            assert modelled > 3 * LINK_MS / 1e3 * new  # the bandwidth term counts too
            wall = sum(r.wall_ms for r in result.stats.records) / 1e3
            assert wall >= modelled, f"{new} round(s): {wall:.3f} s < modelled {modelled:.3f} s"
            if new == 1:
                # Round 1 carries the whole prompt: its hidden states alone take ~10 ms at 2 Mbit/s.
                assert links["edge1->edge2", UPLINK][0] * 8 / (LINK_MBPS * 1e6) > 5e-3


# ---------- errors ----------

def _answer(actor, data) -> object:
    answer = ray.get(actor.step.remote(data), timeout=60)
    if isinstance(answer, ray.ObjectRef):  # a frame for the next stage, left on this one's node
        answer = ray.get(answer, timeout=60)
    return codec.decode(answer)


def test_bad_messages_are_answered_with_errors_and_the_workers_keep_serving(engines):
    engine = engines["local", 2]
    first, last = engine.backend.target.stages
    reference = engines["inproc", 2].generate(PROMPT).output_ids
    garbage = _answer(first, b"\x01\x00not a frame")
    assert isinstance(garbage, ErrorMessage) and garbage.code == "ProtocolError"
    assert isinstance(_answer(first, 12345), ErrorMessage)

    opened = OpenSession("probe", SamplingParams())
    ray.get([first.open.remote(opened), last.open.remote(opened)], timeout=60)
    try:
        proposal = DraftProposal("probe", 1, 0, [1, 2, 3], torch.zeros(0, dtype=torch.int64),
                                 SparseDist.empty(256))
        frame = _answer(first, codec.encode(proposal))
        assert isinstance(frame, StageFrame) and frame.hidden.shape == (3, 64)
        stale = _answer(first, codec.encode(proposal))
        assert isinstance(stale, ErrorMessage) and (stale.session_id, stale.round) == ("probe", 1)
        assert "stale round 1" in stale.text
        misrouted = _answer(last, codec.encode(proposal))  # a proposal for a later stage
        assert isinstance(misrouted, ErrorMessage) and "got a DraftProposal" in misrouted.text
        unknown = DraftProposal("nobody", 1, 0, [1], torch.zeros(0, dtype=torch.int64),
                                SparseDist.empty(256))
        with pytest.raises(RemoteError, match="round 1 of session nobody failed: KeyError: .*no open session"):
            engine.backend.target.verify(unknown)
    finally:
        ray.get([first.close.remote("probe"), last.close.remote("probe")], timeout=60)
    assert engine.generate(PROMPT).output_ids == reference


def _engine_pid(engine, role: str) -> int:
    return next(w["pid"] for w in engine.backend.workers if w["role"] == role)


@pytest.fixture(scope="module")
def fragile(local_ray, model_cache):
    """A draft and one stage with a short deadline, for the failure tests below (in file order: a
    worker is stopped and resumed, then one is killed, which leaves the engine broken)."""
    with SpecMesh(_config(model_cache, backend="local", num_stages=1, max_new_tokens=16)) as engine:
        engine.backend.target.calls.timeout_s = DEADLINE_S
        yield engine


def test_a_stuck_worker_misses_the_deadline_and_the_pipeline_recovers(fragile):
    reference = fragile.generate(PROMPT).output_ids
    pid = _engine_pid(fragile, "stage0")
    rounds = iter(fragile.generation(PROMPT))
    next(rounds)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=rf"round 2 of session \w+: no verdict within "
                                              rf"{DEADLINE_S:g} s; stage0 \(pid {pid} .*has not answered"):
            next(rounds)
        elapsed = time.monotonic() - t0
        assert DEADLINE_S <= elapsed < DEADLINE_S + GRACE_S  # cleanup did not wait on it again
    finally:
        os.kill(pid, signal.SIGCONT)
    assert fragile.generate(PROMPT).output_ids == reference


def test_a_killed_worker_fails_the_generation_by_name_within_the_deadline(fragile):
    pid = _engine_pid(fragile, "draft")
    rounds = iter(fragile.generation(PROMPT))
    next(rounds), next(rounds)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match=rf"round 3 of session \w+: draft \(pid {pid} on node \w+\) died"):
        next(rounds)
    assert time.monotonic() - t0 < DEADLINE_S
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match=rf"draft \(pid {pid} .*\) died"):
        fragile.generate(PROMPT)  # the engine stays broken, and says so at once
    assert time.monotonic() - t0 < DEADLINE_S


def test_a_worker_that_cannot_load_fails_the_build_by_name_and_nothing_is_left(local_ray, model_cache):
    before = set(actor_states())
    bad_draft = "tiny-draft:heads=3"  # 64 hidden units do not split into 3 heads: fails in the actor
    with pytest.raises(RuntimeError, match=r"a worker failed to start: draft died: .*do not divide"):
        SpecMesh(_config(model_cache, backend="local", num_stages=1, draft=bad_draft))
    started = set(actor_states()) - before
    assert len(started) == 2  # the stage and the draft were started...
    assert set(wait_dead(started).values()) == {"DEAD"}  # ...and none is left
