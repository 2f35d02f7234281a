"""The draft-cost benchmark measures every shipped draft variant and the target side by side."""
from specmesh.benchmarks import draft_cost


def test_draft_cost_measures_every_variant_and_the_target(capsys):
    out = draft_cost.main(["--draft", "tiny-draft", "--target", "tiny", "--quick", "--dtype", "float32",
                           "--head-rows", "64"])
    labels = list(out)
    assert labels == ["float32", "int8", "int4", "auto", "int8 + head 64", "target float32"], labels
    assert all(ms > 0 for ms in out.values())
    printed = capsys.readouterr().out
    assert "/ target" in printed and "int8 + head 64" in printed
