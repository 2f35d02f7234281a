"""The compiled-graph benchmark runs both ways over the same chain and reports each."""
from specmesh.benchmarks import ray_cgraph


def test_compiled_graph_and_actor_calls_both_carry_the_round(capsys):
    out = ray_cgraph.main(["--rounds", "5", "--hidden-bytes", "4096"])
    assert set(out) == {"actor calls", "compiled graph"}
    assert all(v["median_ms"] > 0 and v["p95_ms"] >= v["median_ms"] for v in out.values())
    assert "saves" in capsys.readouterr().out
