"""float32 linear layers on oneDNN where this CPU runs them faster than the default BLAS.

torch computes a float32 ``nn.Linear`` on the CPU with its BLAS (MKL in the PyPI build). MKL's
small-row kernels are slow on some CPUs: on a 2-core AVX2-only AMD EPYC, the bundled 1.5B target's
forward of 4 and 9 new tokens took 2041 and 2133 ms through MKL and 788 and 915 ms with every linear
layer on oneDNN (``torch.utils.mkldnn.MkldnnLinear``, the weight kept in oneDNN's blocked layout),
and one token 582 against 494 ms; the logits agree to 1e-4 (float32 summation order). Verification
forwards are exactly those few-row shapes, so the round's largest cost falls by more than half.

Which library is faster depends on the CPU, so the choice is measured (:func:`onednn_is_faster`),
once per process and weight shape: a few products of that shape through each, at the rows of a
decode step (1) and of a verification (8). bfloat16 stages are left as they are (their kernels are
oneDNN's already), as are layers below :data:`MIN_WEIGHTS` (tiny models: nothing to win, and their
tests compare logits across feeds), and a draft that is to be int8-quantised (the quantiser
replaces ``nn.Linear`` modules; it must still find them).

``SPECMESH_CPU_LINEAR`` overrides the measurement: ``auto`` (default), ``onednn`` or ``blas``.
"""
from __future__ import annotations

import functools
import os
import time

import torch
from torch.utils.mkldnn import MkldnnLinear

MODES = ("auto", "onednn", "blas")
ENV = "SPECMESH_CPU_LINEAR"
MIN_WEIGHTS = 1 << 20  # a layer of fewer weights stays on the BLAS
GAIN = 1.2  # oneDNN is chosen where it is at least this much faster at verification rows
SLACK = 1.15  # ... and at most this much slower at a decode step's one row (the clock's noise at ~1 ms)
PROBE_ROWS = (1, 8)  # a decode step's rows and a verification's
PROBE_REPEATS = 7


def mode_from_env() -> str:
    """``SPECMESH_CPU_LINEAR`` (default ``auto``).

    Raises:
        ValueError: a value other than ``auto``, ``onednn`` or ``blas``.
    """
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: must be one of {', '.join(MODES)}")
    return mode


def _seconds(fn, x: torch.Tensor) -> float:
    fn(x)  # warm: first calls allocate and pick kernels
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=None)
def onednn_is_faster(in_features: int, out_features: int) -> bool:
    """Whether a float32 ``[out, in]`` linear layer runs faster on oneDNN than on the BLAS here: at
    least :data:`GAIN` times at 8 rows and at most :data:`SLACK` times slower at 1 row (the best of
    a few timed calls each: on a shared 2-core machine one call in twenty stalls)."""
    dense = torch.nn.Linear(in_features, out_features, bias=False)
    fast = MkldnnLinear(dense, torch.float32)
    times = {}
    with torch.no_grad():
        for rows in PROBE_ROWS:
            x = torch.randn(1, rows, in_features)  # [1, rows, in]
            times[rows] = (_seconds(dense, x), _seconds(fast, x))
    (blas1, dnn1), (blas8, dnn8) = times[PROBE_ROWS[0]], times[PROBE_ROWS[1]]
    return blas8 >= GAIN * dnn8 and dnn1 <= SLACK * blas1


def use_onednn(module: torch.nn.Module, mode: str | None = None) -> int:
    """Replaces, in place, every float32 CPU ``nn.Linear`` of ``module`` with at least
    :data:`MIN_WEIGHTS` weights by its oneDNN form where ``mode`` says so (``auto``: where
    :func:`onednn_is_faster` measures it). Returns how many layers were replaced.

    Args:
        module: a loaded model (inference only: the oneDNN layer has no gradient).
        mode: ``auto``, ``onednn`` or ``blas``; None reads ``SPECMESH_CPU_LINEAR``.
    """
    mode = mode_from_env() if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"cpu linear mode {mode!r}: must be one of {', '.join(MODES)}")
    if mode == "blas" or not torch.backends.mkldnn.is_available():
        return 0
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not _eligible(child):
                continue
            if mode == "auto" and not onednn_is_faster(child.in_features, child.out_features):
                continue
            # no_grad: under autograd the converted weight's grad_fn keeps the float32 original
            # alive, and the model's memory doubled (1.5B target: 7.0 -> 12.7 GB)
            with torch.no_grad():
                setattr(parent, name, MkldnnLinear(child, torch.float32))
            swapped += 1
    return swapped


def _eligible(layer: torch.nn.Module) -> bool:
    return (type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
            and layer.weight.device.type == "cpu" and layer.weight.numel() >= MIN_WEIGHTS)
