"""A topology file may choose the policies: its [policies] table reaches the engine's config."""
from __future__ import annotations

import pytest

from specmesh.cluster.inproc import config_from_topology
from specmesh.cluster.topology import dump_topology, load_topology, parse_topology

NODES = "".join(f'[[nodes]]\nname = "{n}"\nrole = "{n.rstrip("12")}"\n' for n in ("device", "edge1", "edge2"))


def _file(tmp_path, policies: str) -> str:
    path = tmp_path / "t.toml"
    path.write_text('stages = ["edge1", "edge2"]\n[models]\ntarget = "tiny"\ndraft = "tiny-draft"\n'
                    f"[policies]\n{policies}\n" + NODES)
    return str(path)


def test_policies_table_sets_config_fields_and_knobs(tmp_path):
    path = _file(tmp_path, 'acceptance = "importance"\nimportance_strength = 0.25\ndraft_length = "heuristic"\n'
                           'gamma = 6\nsparse_k = 8')
    cfg = config_from_topology(path)
    assert (cfg.acceptance, cfg.draft_length, cfg.gamma, cfg.sparse_k) == ("importance", "heuristic", 6, 8)
    assert dict(cfg.policy_options) == {"importance_strength": 0.25}
    assert cfg.policy_map()["importance_strength"] == 0.25
    # options given beside the file (the command line) win over it
    over = config_from_topology(path, acceptance="exact", gamma=3, policy_options={"importance_strength": 0.5})
    assert (over.acceptance, over.gamma, dict(over.policy_options)) == ("exact", 3, {"importance_strength": 0.5})
    topology = load_topology(path)
    assert parse_topology(__import__("tomllib").loads(dump_topology(topology))) == topology


@pytest.mark.parametrize("policies, message", [
    ('acceptance = "nonsense"', "unknown acceptance policy 'nonsense'"),
    ("sparse_k = 0", "sparse_k must be >= 1"),
    ("importance_strength = [1, 2]", "policies.importance_strength = [1, 2]: must be a string, number or bool"),
])
def test_bad_policies_name_the_value(tmp_path, policies, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_topology(_file(tmp_path, policies))


def test_the_shipped_50ms_layout_drafts_a_tree():
    from specmesh.cluster.topology import example_path

    cfg = config_from_topology(str(example_path("one_machine_50ms")))
    assert cfg.tree_width == 2 and cfg.acceptance == "exact"
