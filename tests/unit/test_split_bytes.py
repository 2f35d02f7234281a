"""The split-verification bytes benchmark's quick path runs and measures what it claims."""
from __future__ import annotations

import torch

from specmesh.benchmarks import split_bytes


def test_quick_path_measures_every_scheme_on_both_links(tmp_path, capsys, monkeypatch):
    measured = []
    real = split_bytes.measure_link
    monkeypatch.setattr(split_bytes, "measure_link", lambda *a: measured.extend(real(*a)) or measured[-4:])
    assert split_bytes.main(["--quick", "--cache-dir", str(tmp_path)]) == 0
    torch.set_num_threads(1)
    out = capsys.readouterr().out
    assert out.count("split, dense q") == 2 and "asymmetric 10 up / 100 down" in out and "symmetric 10 / 10" in out
    rows = {(r.link.split()[0], r.scheme): r for r in measured}
    assert len(rows) == 8
    for link in ("asymmetric", "symmetric"):
        dense, top_k, split = rows[link, "dense q"], rows[link, "top-K q"], rows[link, "split"]
        assert split.up_per_token < top_k.up_per_token < dense.up_per_token
        assert split.same_as_reference and split.tokens == top_k.tokens == 12
        assert all(r.tokens_per_s > 0 for r in (dense, top_k, split))
