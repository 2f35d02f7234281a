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
            # Each receiver records the delay it applied: exactly the model, never more or less.
            assert result.stats.link_delay_ms == pytest.approx(modelled * 1e3, rel=1e-6)
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
    ray.get([first.open.remote(codec.encode(opened)), last.open.remote(codec.encode(opened))], timeout=60)
    try:
        proposal = DraftProposal("probe", 1, 0, [1, 2, 3], torch.zeros(0, dtype=torch.int64),
                                 SparseDist.empty(256))
        frame = _answer(first, codec.encode(proposal))
        assert isinstance(frame, StageFrame) and frame.hidden.shape == (3, 64)
        stale = _answer(first, codec.encode(proposal))
        assert isinstance(stale, ErrorMessage) and (stale.session_id, stale.round) == ("probe", 1)
        assert "stale round 1" in stale.text
        with pytest.raises(ray.exceptions.RayTaskError, match="open takes an encoded OpenSession frame"):
            ray.get(first.open.remote(opened), timeout=60)  # a Python object: never on a SpecMesh link
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
    """The current pid of worker ``role`` (it changes when the worker is replaced)."""
    target = engine.backend.target
    worker = target.draft if role == "draft" else next(w for w in target.workers if w.role == role)
    return worker.info["pid"]


@pytest.fixture(scope="module")
def fragile(local_ray, model_cache):
    """A draft and two stages with a short deadline, for the failure tests below."""
    with SpecMesh(_config(model_cache, backend="local", num_stages=2, max_new_tokens=16,
                          timeout_s=DEADLINE_S)) as engine:
        yield engine


def _disturbed(engine, role: str, sig: int, after_rounds: int = 2, **kw):
    """Generates, sending ``sig`` to worker ``role`` after ``after_rounds`` rounds; returns the
    result and the seconds the disturbed round took."""
    gen = engine.generation(PROMPT, **kw)
    rounds = iter(gen)
    for _ in range(after_rounds):
        next(rounds)
    pid = _engine_pid(engine, role)
    os.kill(pid, sig)
    t0 = time.monotonic()
    try:
        next(rounds)
        took = time.monotonic() - t0
        for _ in rounds:
            pass
    finally:
        if sig == signal.SIGSTOP:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:  # replaced: the stuck process was killed
                pass
    return gen, took, pid


def test_a_killed_stage_is_replaced_and_the_seeded_output_is_unchanged(fragile):
    """Stage 1 dies mid-generation: it is noticed (by name, not blamed on the draft), replaced, its
    KV cache rebuilt from the committed tokens, and the seeded sampled output is the undisturbed one."""
    kw = dict(temperature=1.0, seed=4)
    reference = fragile.generate(PROMPT, **kw)
    gen, took, pid = _disturbed(fragile, "stage1", signal.SIGKILL, **kw)
    assert gen.output_ids == reference.output_ids
    assert len(gen.stats.recoveries) == 1, gen.stats.recoveries
    assert f"stage1 (pid {pid}" in gen.stats.recoveries[0] and "died" in gen.stats.recoveries[0]
    assert _engine_pid(fragile, "stage1") != pid
    assert took < DEADLINE_S + 60  # noticed at once (not at the deadline); the reload is the rest
    assert fragile.generate(PROMPT, **kw).output_ids == reference.output_ids  # the engine serves on


def test_a_stuck_stage_misses_the_deadline_and_is_replaced(fragile):
    reference = fragile.generate(PROMPT).output_ids
    gen, took, pid = _disturbed(fragile, "stage0", signal.SIGSTOP)
    assert gen.output_ids == reference
    assert f"no verdict within {DEADLINE_S:g} s; stage0 (pid {pid}" in gen.stats.recoveries[0]
    assert DEADLINE_S <= took < DEADLINE_S + GRACE_S + 60  # the deadline, then one reload
    assert fragile.generate(PROMPT).output_ids == reference


def test_a_killed_draft_falls_back_to_target_only_and_comes_back(fragile):
    reference = fragile.generate(PROMPT, max_new_tokens=40).output_ids
    gen, _, pid = _disturbed(fragile, "draft", signal.SIGKILL, max_new_tokens=40)
    assert gen.output_ids == reference  # greedy: target-only rounds commit the same tokens
    notes = gen.stats.recoveries
    assert notes[0].endswith("draft failed, target-only"), notes
    drafted = [r.gamma for r in gen.stats.records]
    assert 0 in drafted[2:], drafted  # some rounds ran without a draft
    if len(notes) > 1:  # the new draft was up before the generation ended
        assert notes[1].endswith("draft back") and drafted[-1] > 0
    assert _engine_pid(fragile, "draft") != pid or len(notes) == 1


def test_a_stage_that_cannot_come_back_ends_with_the_committed_tokens(fragile, monkeypatch):
    from specmesh.runtime import GenerationError

    reference = fragile.generate(PROMPT).output_ids
    worker = next(w for w in fragile.backend.target.workers if w.role == "stage0")

    def cannot_start():
        raise RuntimeError("no node can host stage0")

    monkeypatch.setattr(worker, "spawn", cannot_start)
    gen = fragile.generation(PROMPT)
    rounds = iter(gen)
    committed = next(rounds) + next(rounds)
    os.kill(_engine_pid(fragile, "stage0"), signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(GenerationError, match="stage0") as err:
        for _ in rounds:
            pass
    assert time.monotonic() - t0 < DEADLINE_S
    assert err.value.output_ids == committed == reference[: len(committed)]
    monkeypatch.undo()
    assert fragile.backend.target.recover("stage0")  # leave a working engine behind


def test_a_worker_that_cannot_load_fails_the_build_by_name_and_nothing_is_left(local_ray, model_cache):
    before = set(actor_states())
    bad_draft = "tiny-draft:heads=3"  # 64 hidden units do not split into 3 heads: fails in the actor
    with pytest.raises(RuntimeError, match=r"a worker failed to start: draft died: .*do not divide"):
        SpecMesh(_config(model_cache, backend="local", num_stages=1, draft=bad_draft))
    started = set(actor_states()) - before
    assert len(started) == 2  # the stage and the draft were started...
    assert set(wait_dead(started).values()) == {"DEAD"}  # ...and none is left


# ---------- load and hostile peers ----------

def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_sixteen_concurrent_sessions_each_equal_their_solo_run(engines):
    """Isolation under load: 16 sessions at once (different prompts and seeds) through one
    deployment; each output equals its own solo run, and no worker keeps a session afterwards."""
    engine = engines["local", 2]
    jobs = [([(7 * i + j) % 250 + 1 for j in range(6 + i % 5)], dict(temperature=1.0, seed=i))
            for i in range(16)]
    solo = [engine.generate(p, **kw).output_ids for p, kw in jobs]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda job: engine.generate(job[0], **job[1]).output_ids, jobs))
    assert together == solo
    handles = [w.handle for w in engine.backend.target.workers] + [engine.backend.target.draft.handle]
    assert ray.get([h.open_sessions.remote() for h in handles], timeout=60) == [0] * len(handles)


def test_a_hostile_peer_cannot_disturb_a_good_session(engines):
    """Garbage, truncations, codec bombs, an oversized frame and messages for unknown sessions fed
    to a live stage while a good session runs beside it: the good output is unchanged, every bad
    frame is answered with an error, and the stage's memory stays bounded."""
    engine = engines["local", 2]
    first = engine.backend.target.workers[0]
    reference = engines["inproc", 2].generate(PROMPT).output_ids
    good = DraftProposal("nobody", 1, 0, [1, 2, 3], torch.zeros(0, dtype=torch.int64), SparseDist.empty(256))
    good_frame = codec.encode(good)
    zstd = __import__("zstandard").ZstdCompressor()
    varint_bomb = bytes([codec.PROTOCOL_VERSION, codec.FLAG_ZSTD]) + zstd.compress(
        b"\x9a\x02\xa1s\x01\x00\xc4\x00\xc4\x00\x90\x90" + b"\x80" * (8 << 20) + b"\x00")
    hostile = [
        os.urandom(64), os.urandom(4096), good_frame[: len(good_frame) // 2], b"", varint_bomb,
        bytes([codec.PROTOCOL_VERSION, 0]) + os.urandom(2 << 20), good_frame,  # the last: unknown session
    ]
    before = _rss_kb(first.info["pid"])
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(engine.generate, PROMPT)
        answers = [_answer(first.handle, data) for data in hostile for _ in range(3)]
        output = running.result(timeout=120).output_ids
    assert output == reference
    assert all(isinstance(a, ErrorMessage) for a in answers), [type(a).__name__ for a in answers]
    grown_mb = (_rss_kb(first.info["pid"]) - before) / 1024
    assert grown_mb < 64, f"the stage grew by {grown_mb:.0f} MB"
