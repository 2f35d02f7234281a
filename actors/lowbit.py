"""Low-bit linear layers: the weight format each linear layer of a worker computes in.

Decoding one token reads every weight once (bound by memory bandwidth); verifying 5-17 rows does
5-17 times the arithmetic on the same weights (bound by arithmetic). One format serves both only if
it is cheap in bytes *and* its kernel stays flat in the number of rows. The formats, all torch's own
operators (no hand-written kernels):

- ``dense``: the model's dtype, ``nn.Linear`` as loaded (float32 layers may run on oneDNN,
  :mod:`.cpu_linear`).
- ``int8``: weights int8, symmetric, one scale per output channel; activations quantised on the fly
  to int8 with one scale per *row*; the product by ``torch._int_mm`` (int8 x int8 -> int32, VNNI
  where the CPU has it), then scaled back. Integer sums are exact, so a row's output does not depend
  on the rows computed beside it, bit for bit: the layer batches across sessions and a token's
  logits do not depend on how it was fed. One 1536x8960 layer, one thread of an AMD EPYC with
  AVX512-VNNI: 0.89 ms for 1 row, 1.73 for 8, 2.34 for 16 (bf16 ``F.linear``: 2.08, 3.00, 3.87).
- ``int4``: weight-only, 4-bit, asymmetric groups of :data:`INT4_GROUP` along the input
  (``aten._weight_int4pack_mm_for_cpu``, bf16 activations, the layout of GGUF's Q4 blocks):
  0.83 ms for 1 row, 2.89 for 8, 5.46 for 16 on the same layer (it grows with the rows).
- ``auto``: per layer shape, the fastest of the three at the rows the worker runs, measured at load
  time (:func:`choose`); a format is kept over an earlier-preferred one only when it is at least
  :data:`GAIN` times faster, so the choice does not flip with the clock's noise.

A layer's format is fixed for the worker's life: target-only decoding and verification run the same
function of the weights, so speculation stays exact relative to the target *as it runs*.
"""
from __future__ import annotations

import ctypes
import os
import functools
import time
from typing import Iterable

import torch

from specmesh.runtime.config import WEIGHT_FORMATS as FORMATS

from . import cpu_linear

INT4_GROUP = 32
#: Under ``auto`` a layer of fewer weights stays dense (tiny models: nothing to win)
MIN_WEIGHTS = 1 << 18
GAIN = 1.2  # a later-preferred format must be at least this much faster to be chosen
PREFERENCE = ("int8", "int4", "dense")  # int8 first: rows independent bit for bit, flat in rows
PROBE_REPEATS = 5
#: Rows per forward a worker runs, for ``auto``: a draft steps one token per session (more when
#: sessions batch); a target stage runs one row to decode and ~gamma + 1 to verify.
DRAFT_ROWS = (1,)
STAGE_ROWS = (1, 8)


def check_format(name: str, what: str = "weights") -> str:
    """``name`` if it is a weight format, else a ValueError naming the value and the choices."""
    if name not in FORMATS:
        raise ValueError(f"{what} must be one of {', '.join(FORMATS)}, got {name!r}")
    return name


class Int8Linear(torch.nn.Module):
    """``y = x W^T + b`` with W int8 per output channel and x quantised to int8 per row.

    Buffers: ``weight`` ``[out, in]`` int8, ``scale`` ``[out]`` float32, ``bias`` ``[out]`` or None.
    """

    fmt = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float()  # [out, in]
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [out]
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()  # [M, in]
        sx = (rows.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)  # [M, 1]
        xq = torch.round(rows / sx).to(torch.int8)  # [M, in]
        acc = torch._int_mm(xq, self.weight.t())  # [M, out] int32, exact
        y = acc.float() * sx * self.scale  # [M, out]
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class Int4Linear(torch.nn.Module):
    """``y = x W^T + b`` with W 4-bit in groups of :data:`INT4_GROUP` input columns, each group
    ``w = (q - 8) * scale + zero`` (q in 0..15), computed in bf16 by torch's packed CPU kernel.

    Buffers: ``packed`` (torch's int4 CPU layout), ``scales_zeros`` ``[in/G, out, 2]`` bf16, ``bias``.
    """

    fmt = "int4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        g = weight.detach().float().view(out_f, in_f // INT4_GROUP, INT4_GROUP)  # [out, groups, G]
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-12)  # [out, groups, 1]
        q = torch.round((g - lo) / scale).clamp(0, 15).to(torch.int32).view(out_f, in_f)
        zero = lo + 8 * scale  # (q - 8) * scale + zero == q * scale + lo
        sz = torch.stack([scale[..., 0].t(), zero[..., 0].t()], dim=-1)  # [groups, out, 2]
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", sz.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        self.in_features, self.out_features = in_f, out_f

    @staticmethod
    def fits(out_features: int, in_features: int) -> bool:
        return in_features % INT4_GROUP == 0 and out_features % 8 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [M, in]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)  # [..., out]


_KINDS = {"int8": Int8Linear, "int4": Int4Linear}


def convert(layer: torch.nn.Linear, fmt: str) -> torch.nn.Module:
    """``layer`` in format ``fmt`` (``dense`` returns it unchanged)."""
    if fmt == "dense":
        return layer
    with torch.no_grad():
        return _KINDS[fmt](layer.weight, layer.bias)


def format_of(layer: torch.nn.Module) -> str:
    return getattr(layer, "fmt", "dense")


def _seconds(layer: torch.nn.Module, x: torch.Tensor) -> float:
    layer(x)  # warm: first calls allocate and pick kernels
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        t0 = time.perf_counter()
        layer(x)
        best = min(best, time.perf_counter() - t0)
    return best


def candidates(out_features: int, in_features: int) -> tuple[str, ...]:
    """The formats a ``[out, in]`` layer can take, in order of preference."""
    fits = {"int8": True, "int4": Int4Linear.fits(out_features, in_features), "dense": True}
    return tuple(f for f in PREFERENCE if fits[f])


@functools.lru_cache(maxsize=None)
def _choose_shape(out_features: int, in_features: int, rows: tuple[int, ...], dtype: torch.dtype,
                  bias: bool) -> str:
    probe = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    x = {m: torch.randn(m, in_features, dtype=dtype) for m in rows}  # [m, in]
    times = {}
    with torch.no_grad():
        for fmt in candidates(out_features, in_features):
            layer = convert(probe, fmt)
            times[fmt] = sum(_seconds(layer, x[m]) for m in rows)
    best = next(iter(times))
    for fmt, t in times.items():
        if t * GAIN <= times[best]:
            best = fmt
    return best


def choose(layer: torch.nn.Linear, fmt: str, rows: Iterable[int]) -> str:
    """The format ``layer`` takes: ``fmt`` itself where the layer's shape fits it (else ``dense``);
    for ``auto``, ``dense`` below :data:`MIN_WEIGHTS` weights (nothing to win) and otherwise the
    measured choice at ``rows`` (timed once per process, shape and dtype)."""
    out_f, in_f = layer.out_features, layer.in_features
    if fmt == "dense" or layer.weight.device.type != "cpu":
        return "dense"
    if fmt == "auto":
        if layer.weight.numel() < MIN_WEIGHTS:
            return "dense"
        return _choose_shape(out_f, in_f, tuple(sorted(set(rows))), layer.weight.dtype, layer.bias is not None)
    return fmt if fmt in candidates(out_f, in_f) else "dense"


def apply(module: torch.nn.Module, fmt: str, rows: Iterable[int]) -> dict[str, int]:
    """Converts, in place, every ``nn.Linear`` of ``module`` to its chosen format (:func:`choose`);
    the dense originals are dropped. float32 layers left dense go to oneDNN where it is faster
    (:func:`cpu_linear.use_onednn`). Returns how many layers took each format.

    Args:
        module: a loaded model (inference only).
        fmt: one of :data:`FORMATS`.
        rows: the rows per forward the worker runs (1 for a decode step, ~gamma + 1 to verify).
    """
    check_format(fmt)
    rows = tuple(rows)
    counts: dict[str, int] = {}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            chosen = choose(child, fmt, rows)
            if chosen != "dense":
                setattr(parent, name, convert(child, chosen))
            counts[chosen] = counts.get(chosen, 0) + 1
    cpu_linear.use_onednn(module)
    release_freed_memory()
    return counts


def summary(counts: dict[str, int]) -> str:
    """``int8 x196, dense x1``: the formats that ran, most used first."""
    return ", ".join(f"{f} x{n}" for f, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "dense"


def release_freed_memory() -> None:
    """Hands the heap's freed pages back to the system (glibc keeps a freed layer's pages otherwise,
    and the dense weights just replaced would still count in the worker's resident memory)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def resident_bytes() -> int:
    """This process's resident memory (bytes), from ``/proc/self/statm``; 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0
