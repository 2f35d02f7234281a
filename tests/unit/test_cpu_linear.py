"""float32 linear layers moved to oneDNN (actors/cpu_linear.py)."""
import gc
import weakref

import pytest
import torch
from torch.utils.mkldnn import MkldnnLinear

from specmesh.actors import cpu_linear


def _model(dtype=torch.float32) -> torch.nn.Sequential:
    torch.manual_seed(0)
    big = torch.nn.Linear(1024, 1024, bias=True)  # exactly MIN_WEIGHTS weights
    small = torch.nn.Linear(1024, 16, bias=False)
    return torch.nn.Sequential(big, torch.nn.ReLU(), small).to(dtype).eval()


def test_large_float32_layers_move_and_compute_the_same():
    model = _model()
    x2, x3 = torch.randn(5, 1024), torch.randn(1, 7, 1024)  # [rows, in], [1, rows, in]
    with torch.no_grad():
        before = model(x2), model(x3)
        assert cpu_linear.use_onednn(model, "onednn") == 1
        after = model(x2), model(x3)
    assert isinstance(model[0], MkldnnLinear) and type(model[2]) is torch.nn.Linear  # the small one stays
    for a, b in zip(before, after):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_the_float32_original_is_freed():
    """Converted outside no_grad, the oneDNN weight's grad_fn kept the original alive (twice the memory)."""
    model = _model()
    original = weakref.ref(model[0].weight)
    assert cpu_linear.use_onednn(model, "onednn") == 1  # called with autograd on, as a loader would
    gc.collect()
    assert original() is None and not model[0].weight.requires_grad


def test_bfloat16_blas_mode_and_auto_follow_their_rules(monkeypatch):
    bf = _model(torch.bfloat16)
    assert cpu_linear.use_onednn(bf, "onednn") == 0 and type(bf[0]) is torch.nn.Linear
    fp = _model()
    assert cpu_linear.use_onednn(fp, "blas") == 0 and type(fp[0]) is torch.nn.Linear
    for faster in (False, True):
        monkeypatch.setattr(cpu_linear, "onednn_is_faster", lambda i, o, f=faster: f)
        m = _model()
        assert cpu_linear.use_onednn(m, "auto") == int(faster)
        assert isinstance(m[0], MkldnnLinear) is faster


def test_env_mode_and_errors_name_the_value(monkeypatch):
    monkeypatch.setenv(cpu_linear.ENV, "blas")
    m = _model()
    assert cpu_linear.use_onednn(m) == 0
    monkeypatch.setenv(cpu_linear.ENV, "ONEDNN")
    assert cpu_linear.mode_from_env() == "onednn"
    monkeypatch.setenv(cpu_linear.ENV, "mkl")
    with pytest.raises(ValueError, match="SPECMESH_CPU_LINEAR='mkl'"):
        cpu_linear.use_onednn(_model())
    with pytest.raises(ValueError, match="'fast'"):
        cpu_linear.use_onednn(_model(), "fast")


def test_the_probe_measures_both_and_returns_a_verdict():
    cpu_linear.onednn_is_faster.cache_clear()
    verdict = cpu_linear.onednn_is_faster(1024, 1024)
    assert isinstance(verdict, bool)
    assert cpu_linear.onednn_is_faster.cache_info().misses == 1
    assert cpu_linear.onednn_is_faster(1024, 1024) is verdict and cpu_linear.onednn_is_faster.cache_info().hits == 1
