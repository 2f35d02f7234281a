"""Failures on 3 real emulated hosts (cluster/examples/tiny_failover.toml: device, edge1, edge2, and
a client): a driver on the head host runs seeded generations while this process kills a stage's
actor, the draft, a whole node, or partitions an edge host and heals it, between two rounds.

Each disturbed run's output equals the undisturbed one and every token is streamed exactly once;
losing every node that can hold a stage ends within the deadline with the committed tokens. The
cluster is brought up once for the module and always torn down (checked), also after a failure.
The tests run in file order: the last two take edge2, then edge1, away for good.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from specmesh.cluster import emulate, emulate_ops, netns
from specmesh.cluster.emulate_plan import owned
from specmesh.cluster.rehearsal import HEALTH_ENV, Rehearsal
from specmesh.cluster.topology import example_path

pytestmark = [pytest.mark.netns, pytest.mark.ray]

PREFIX = f"smxq{os.getpid() % 100000}-"
ADDRESS = {"device": "10.213.0.1", "edge1": "10.213.0.2", "edge2": "10.213.0.3"}
DEADLINE_S = 30.0  # the round deadline (SpecConfig.timeout_s)
HOP_S = 2.0  # the per-hop deadline (SpecConfig.hop_timeout_s)
MARGIN_S = 2.0  # noticing a failure: the deadline plus this (a loaded 2-core machine)
HEAL_AFTER_S = HOP_S + 1.0  # a partition lasts past its hop deadline, not until Ray calls the node dead
# (HEALTH_ENV: ~12 s for a partitioned node)
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 128, 64]
NEW_TOKENS = 24
SEEDED, GREEDY = dict(temperature=1.0, seed=5), dict(temperature=0.0)
PAUSE = 2  # rounds before the disturbance


def ours() -> list[str]:
    return [n for n in netns.netns_list() if owned(n, PREFIX)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = netns.unavailable_reason(f"{PREFIX}probe")
    if reason:
        pytest.skip(reason)
    try:
        yield emulate.up(example_path("tiny_failover"), prefix=PREFIX, env={**os.environ, **HEALTH_ENV})
    finally:
        pids = [p for n in ours() for p in netns.pids(n)]
        emulate.down(PREFIX)
        assert not ours() and not [p for p in pids if netns.alive(p)]


@pytest.fixture(scope="module")
def driver(cluster, tmp_path_factory):
    config = dict(target="tiny:layers=4", draft="tiny-draft", dtype="float32", threads=1, max_new_tokens=NEW_TOKENS,
                  timeout_s=DEADLINE_S, hop_timeout_s=HOP_S, cache_dir=str(tmp_path_factory.mktemp("models")))
    rehearsal = Rehearsal(cluster, config)
    try:
        yield rehearsal
    finally:
        rehearsal.close()


@pytest.fixture(scope="module")
def reference(driver) -> list[int]:
    """The undisturbed seeded output, twice the same, streamed once per token."""
    placed = {w["role"]: w["ip"] for w in driver.ready["workers"]}
    assert placed == {"draft": ADDRESS["device"], "stage0": ADDRESS["edge1"], "stage1": ADDRESS["edge2"]}
    return undisturbed(driver, SEEDED)


def undisturbed(driver, kw: dict) -> list[int]:
    outputs = []
    for _ in range(2):
        answer, streamed = driver.generate(PROMPT, kw)
        assert answer["event"] == "done" and answer["recoveries"] == [], answer
        assert sum(streamed, []) == answer["output_ids"]
        outputs.append(answer["output_ids"])
    assert outputs[0] == outputs[1] and len(outputs[0]) == NEW_TOKENS
    return outputs[0]


def workers(driver) -> dict[str, dict]:
    return {w["role"]: w for w in driver.ask("workers")["workers"]}


def disturbed(driver, disturb, kw: dict = SEEDED) -> tuple[dict, list[list[int]]]:
    return driver.generate(PROMPT, kw, pause_after=PAUSE, disturb=disturb)


def assert_survived(answer: dict, streamed: list[list[int]], reference: list[int], role: str) -> dict:
    """The run ended with the undisturbed output, every token streamed once, ``role`` recovered."""
    assert answer["event"] == "done", answer
    assert answer["output_ids"] == reference
    assert sum(streamed, []) == reference  # nothing committed was lost or sent twice
    first = answer["recoveries"][0]
    # A draft is replaced in the background (target-only rounds meanwhile): it may not be up yet.
    assert first["role"] == role and first.get("ok", role == "draft"), answer["recoveries"]
    return first


def test_a_killed_stage_actor_is_replaced_on_its_node(driver, reference):
    old = workers(driver)["stage0"]
    answer, streamed = disturbed(driver, lambda: os.kill(old["pid"], signal.SIGKILL))
    first = assert_survived(answer, streamed, reference, "stage0")
    assert first["asked_s"] < MARGIN_S, first  # a dead actor is noticed at once, not at a deadline
    assert any("stage0" in n and "died" in n for n in answer["notes"]), answer["notes"]
    new = workers(driver)["stage0"]
    assert new["pid"] != old["pid"] and new["ip"] == ADDRESS["edge1"]


def test_a_killed_draft_falls_back_to_target_only_and_the_output_is_unchanged(driver):
    """Greedy: target-only rounds sample other draws than speculative ones (exact acceptance keeps
    the distribution, not the samples), so a seeded sampled output may change; a greedy one may not."""
    greedy = undisturbed(driver, GREEDY)
    old = workers(driver)["draft"]
    answer, streamed = disturbed(driver, lambda: os.kill(old["pid"], signal.SIGKILL), GREEDY)
    assert_survived(answer, streamed, greedy, "draft")
    assert any(n.endswith("draft failed, target-only") for n in answer["notes"]), answer["notes"]
    deadline = time.monotonic() + DEADLINE_S
    while workers(driver)["draft"]["pid"] == old["pid"] and time.monotonic() < deadline:
        time.sleep(0.5)  # the replacement loads in the background
    assert workers(driver)["draft"]["pid"] != old["pid"]
    again, _ = driver.generate(PROMPT, GREEDY)  # the new draft serves the next session
    assert again["output_ids"] == greedy and again["recoveries"] == [], again


def test_a_partitioned_edge_host_fails_its_hop_and_heal_brings_it_back(driver, cluster, reference):
    timer = threading.Timer(HEAL_AFTER_S, emulate_ops.heal, args=(cluster,))

    def cut() -> None:
        emulate_ops.partition(cluster, "edge1")
        timer.start()

    try:
        answer, streamed = disturbed(driver, cut)
    finally:
        timer.cancel()
        emulate_ops.heal(cluster)
    first = assert_survived(answer, streamed, reference, "stage0")
    assert HOP_S <= first["asked_s"] < HOP_S + MARGIN_S, first  # the hop's deadline, not the round's
    assert any("-> stage0" in n and f"missed its {HOP_S:g} s deadline" in n for n in answer["notes"]), \
        answer["notes"]
    assert workers(driver)["stage0"]["ip"] == ADDRESS["edge1"]


def test_a_killed_edge_node_moves_its_stage_to_the_other_edge_node(driver, cluster, reference):
    assert workers(driver)["stage1"]["ip"] == ADDRESS["edge2"]
    answer, streamed = disturbed(driver, lambda: emulate_ops.kill(cluster, "edge2"))
    first = assert_survived(answer, streamed, reference, "stage1")
    assert first["asked_s"] < HOP_S + MARGIN_S, first
    assert workers(driver)["stage1"]["ip"] == ADDRESS["edge1"]  # the stand-in: edge1 shares specmesh_edge


def test_losing_every_node_that_can_hold_a_stage_ends_in_time_with_the_committed_tokens(driver, cluster,
                                                                                       reference):
    answer, streamed = disturbed(driver, lambda: emulate_ops.kill(cluster, "edge1"))
    assert answer["event"] == "error", answer
    committed = sum(streamed, [])
    assert len(streamed) == PAUSE and answer["output_ids"] == committed == reference[: len(committed)]
    assert answer["s"] < DEADLINE_S, answer
    assert "stage" in answer["message"] and [r["ok"] for r in answer["recoveries"]] == [False], answer
