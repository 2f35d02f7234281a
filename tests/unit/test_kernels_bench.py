"""The kernels benchmark (benchmarks/kernels.py) runs every candidate and names the fastest."""
import torch

from specmesh.actors import lowbit
from specmesh.benchmarks import kernels


def test_quick_run_times_every_candidate_per_row_count():
    results = kernels.main(["--quick", "--memory-mb", "1"])
    assert [r["rows"] for r in results] == [1, 8]
    for r in results:
        names = ["dense", "int8", "int8 w-only", "int4", "int4 -> dense"]
        assert all(r[n] > 0 for n in names) and r["fastest"] == min(names, key=r.get)


def test_the_dequantised_int4_weight_is_what_the_kernel_computes_with():
    torch.manual_seed(0)
    layer = lowbit.Int4Linear(torch.randn(128, 64), None)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    want = layer(x).float()
    got = torch.nn.functional.linear(x, kernels.dequantised(layer)).float()
    assert torch.allclose(got, want, rtol=0.02, atol=0.02 * float(want.abs().max()))
