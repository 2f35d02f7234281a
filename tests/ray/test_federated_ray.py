"""SpecFed on local Ray: the shipped federated topology (two tiny workers of different seeds, the
second split into two stages, 2 ms links), every stage its own actor, against the same deployment in
process. Same tokens (greedy, seeded sampling, top-K and dense), the same bytes on every worker link,
and a worker stage that dies or sticks is named, replaced and replayed without changing the output.
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal

import pytest
from typer.testing import CliRunner

from specmesh.cluster.cli import app
from specmesh.cluster.inproc import config_from_topology
from specmesh.cluster.topology import example_path
from specmesh.policies import federated as fed
from specmesh.runtime import GenerationError, SpecMesh

from .test_backends import PROMPT, _disturbed, _engine_pid  # the failure tests' prompt and helpers

pytestmark = pytest.mark.ray

EXAMPLE = str(example_path("federated_tiny"))
WORKER_LINKS = ("worker1:device->edge1", "worker1:edge1->device", "worker2:device->edge2",
                "worker2:edge2->edge3", "worker2:edge3->device")
HOP_DEADLINE_S = 5.0  # a stuck worker stage is noticed by its hop's deadline, long before the round's
ROUND_DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def engines(local_ray, model_cache):
    kw = dict(cache_dir=model_cache, dtype="float32", threads=1, max_new_tokens=16)
    inproc = SpecMesh(config_from_topology(EXAMPLE, **kw))
    local = SpecMesh(config_from_topology(EXAMPLE, backend="local", timeout_s=ROUND_DEADLINE_S,
                                          hop_timeout_s=HOP_DEADLINE_S, **kw))
    yield local, inproc
    local.close()
    inproc.close()


def _links(snapshot) -> dict[tuple[str, str], tuple[int, int]]:
    return {(r["link"], r["direction"]): (r["bytes"], r["messages"]) for r in snapshot.as_rows()}


def _with(engine: SpecMesh, settings: fed.FederatedSettings) -> SpecMesh:
    """The same workers under other federated settings (top-K, strategy)."""
    backend = engine.backend
    return SpecMesh(engine.config, dataclasses.replace(backend, target=backend.target.with_settings(settings)))


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0, seed=3), dict(temperature=1.0, seed=8)],
                         ids=["greedy", "sampled-3", "sampled-8"])
def test_ray_equals_in_process_token_for_token_and_byte_for_byte(engines, kw):
    local, inproc = engines
    counted = {}
    for name, engine in (("local", local), ("inproc", inproc)):
        before = engine.backend.traffic.snapshot()
        gen = engine.generation(PROMPT, **kw)
        gen.run()
        after = _links(engine.backend.traffic.snapshot())
        prior = _links(before)
        counted[name] = gen, {k: (v[0] - prior.get(k, (0, 0))[0], v[1] - prior.get(k, (0, 0))[1])
                              for k, v in after.items() if v != prior.get(k, (0, 0))}
    (got, got_links), (want, want_links) = counted["local"], counted["inproc"]
    assert got.output_ids == want.output_ids and len(got.output_ids) > 8
    assert {name for name, _ in got_links} == set(WORKER_LINKS)
    assert all(msgs == got.stats.rounds for _, msgs in got_links.values())  # every worker, every round
    # The device's links carry the same frames byte for byte. Between stages the hidden states are
    # zstd-compressed floats: another process may round a last bit differently, and its size move.
    device = {k: v for k, v in got_links.items() if "edge2->edge3" not in k[0]}
    assert device == {k: v for k, v in want_links.items() if "edge2->edge3" not in k[0]}
    (between, msgs), = (v for k, v in got_links.items() if "edge2->edge3" in k[0])
    (want_between, want_msgs), = (v for k, v in want_links.items() if "edge2->edge3" in k[0])
    assert msgs == want_msgs and abs(between - want_between) <= 0.01 * want_between
    s, t = got.stats, want.stats
    assert (s.bytes_up, s.bytes_down) == (t.bytes_up, t.bytes_down) and s.bytes_down > 0


@pytest.mark.parametrize("k,strategy", [(0, fed.ZERO), (2, fed.ZERO), (4, fed.SPREAD_UNIFORM)])
def test_other_settings_equal_in_process(engines, k, strategy):
    local, inproc = engines
    settings = fed.FederatedSettings(local.backend.target.settings.weights, k, strategy)
    got, want = (_with(e, settings).generate(PROMPT, temperature=1.0, seed=5) for e in (local, inproc))
    assert got.output_ids == want.output_ids
    assert got.stats.bytes_up == want.stats.bytes_up
    if k:
        assert got.stats.bytes_down == want.stats.bytes_down
    else:  # dense rows are zstd-compressed floats (see above): their size may move a little
        assert abs(got.stats.bytes_down - want.stats.bytes_down) <= 0.01 * want.stats.bytes_down


def test_every_worker_stage_is_its_own_actor(engines):
    local, _ = engines
    roles = {w["role"]: w["pid"] for w in local.backend.workers}
    assert set(roles) == {"draft", "stage0@worker1", "stage0@worker2", "stage1@worker2"}
    assert len(set(roles.values())) == 4 and os.getpid() not in roles.values()
    assert local.backend.device_links == tuple(n for n in WORKER_LINKS if "edge2->edge3" not in n)


def test_the_cli_runs_the_federated_topology_on_local_ray(local_ray, model_cache):
    result = CliRunner().invoke(app, [
        "run", "--backend", "local", "--topology", EXAMPLE, "--prompt-ids", "5,17,42", "--max-new-tokens", "6",
        "--dtype", "float32", "--threads", "1", "--cache-dir", model_cache, "--temperature", "0"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "backend=local" in text and "worker2: device->edge2 2ms/1000Mbps, edge2->edge3" in text
    assert re.search(r"specmesh\s*│\s*6\s*│", text), text  # the 6 tokens, through both workers' actors


def test_a_killed_worker_stage_is_named_replaced_and_replayed(engines):
    local, _ = engines
    kw = dict(temperature=1.0, seed=4)
    reference = local.generate(PROMPT, **kw).output_ids
    gen, _, pid = _disturbed(local, "stage1@worker2", signal.SIGKILL, **kw)
    assert gen.output_ids == reference
    assert len(gen.stats.recoveries) == 1 and f"stage1@worker2 (pid {pid}" in gen.stats.recoveries[0]
    assert _engine_pid(local, "stage1@worker2") != pid


def test_a_stuck_worker_stage_misses_its_hop_deadline_while_the_other_worker_answers(engines):
    local, _ = engines
    reference = local.generate(PROMPT).output_ids
    gen, _, pid = _disturbed(local, "stage0@worker1", signal.SIGSTOP)
    assert gen.output_ids == reference
    note = gen.stats.recoveries[0]
    assert f"the hop draft -> stage0@worker1 (pid {pid}" in note and f"missed its {HOP_DEADLINE_S:g} s" in note


def test_a_worker_stage_that_cannot_come_back_fails_the_generation_by_name(engines, monkeypatch):
    local, _ = engines
    worker = next(w for w in local.backend.target.workers if w.role == "stage0@worker2")
    monkeypatch.setattr(worker, "spawn", None)
    gen = local.generation(PROMPT)
    rounds = iter(gen)
    committed = next(rounds)
    os.kill(_engine_pid(local, "stage0@worker2"), signal.SIGKILL)
    with pytest.raises(GenerationError, match=r"stage0@worker2 \(pid \d+ on node \w+\) died") as err:
        for _ in rounds:
            pass
    assert err.value.output_ids[: len(committed)] == committed
    monkeypatch.undo()
    assert local.backend.target.recover("stage0@worker2")  # leave a working engine behind
