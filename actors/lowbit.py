"""Low-bit linear layers: the weight format each linear layer of a worker computes in.

Decoding one token reads every weight once (bound by memory bandwidth); verifying 5-17 rows and
evaluating a prompt do that many times the arithmetic on the same weights. The formats, all torch's
own operators (no hand-written kernels; torchao 0.18's CPU layouts were measured and were slower
here: its int8 x int8 path 26 ms and its int8-activation x int4-weight path 81 ms per call on the
layer below, their packed kernels not built for x86):

- ``dense``: the model's dtype, ``nn.Linear`` as loaded (float32 layers may run on oneDNN,
  :mod:`.cpu_linear`).
- ``int8``: weights int8, symmetric, one scale per output channel; activations quantised on the fly
  to int8 with one scale per *row*; the product by ``torch._int_mm`` (int8 x int8 -> int32, VNNI
  where the CPU has it), then scaled back. Integer sums are exact, so a row's output does not depend
  on the rows computed beside it: the layer batches across sessions. But quantising activations
  magnifies float rounding: where a token's hidden state differs in the last bits between two ways
  of feeding it (one forward over five tokens, or five forwards of one), a value can round to the
  next int8 step, and the bundled 1.5B's logits then differ by up to ~1 logit (``int4``: ~0.1,
  float32 ``dense``: ~3e-5). Fastest for many rows: prompts, verification, batches.
- ``int4``: weight-only, 4-bit, asymmetric groups of :data:`INT4_GROUP` along the input
  (``aten._weight_int4pack_mm_for_cpu``, bf16 activations, the layout of GGUF's Q4 blocks).
  Fastest for one row; its cost grows with the rows.
- ``auto``: per layer shape, the format that serves the worker's typical request fastest
  (:data:`DRAFT_WORK`, :data:`STAGE_WORK`), measured at load time on weights read from memory
  (:func:`choose`); a format displaces the role's preferred one (int4 for a draft, int8 for a
  stage) only when at least :data:`GAIN` times faster, so the choice does not flip with the clock's
  noise (two stages loading on one core time each other's probes).

One 1536x8960 layer, one thread of an AMD EPYC with AVX512-VNNI and AVX512-BF16, weights read from
memory, ms per call (``python -m specmesh.benchmarks.kernels``): 1 row: bf16 2.72, int8 1.60, int4
0.90; 8 rows: 3.55, 2.29, 2.70; 16 rows: 4.08, 3.00, 5.64; 64 rows: int4 ~21, int8 ~5.7. The whole
1.5B, 150 prompt tokens in one forward: int4 5.5 s, bf16 2.5 s, int8 1.4 s.

A layer's format is fixed for the worker's life: target-only decoding and verification run the same
weights, so speculation stays exact relative to the target *as it runs* (greedy outputs may part
only where the target's top two logits are within the format's rounding, above).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from specmesh.runtime.config import WEIGHT_FORMATS as FORMATS

from . import cpu_linear
from .memory import release_freed_memory

INT4_GROUP = 32
#: Under ``auto`` a layer of fewer weights stays dense (tiny models: nothing to win)
MIN_WEIGHTS = 1 << 18
GAIN = 1.2  # a later-preferred format must be at least this much faster to be chosen
PROBE_REPEATS = 5
PROBE_MAX_OUT = 16384  # a probe of a wider layer (an LM head) times this many of its outputs


@dataclass(frozen=True)
class Workload:
    """A worker's typical request, for ``auto``: ``rows`` pairs (rows per forward, forwards), and the
    formats in order of preference (a later one must be :data:`GAIN` times faster to be chosen)."""

    rows: tuple[tuple[int, int], ...]
    preference: tuple[str, ...]


#: A draft evaluates a 128-token prompt (two forwards of 64 rows) and drafts ~96 single tokens for
#: 64 new ones (gamma 4 plus the steps verification rejects): int4 first, the one-row format.
DRAFT_WORK = Workload(((1, 96), (64, 2)), ("int4", "int8", "dense"))
#: A target stage evaluates the prompt and verifies ~16 rounds of gamma + 1 = 5-9 rows: int8
#: first, flat in rows (prompts, verification, batches).
STAGE_WORK = Workload(((8, 16), (64, 2)), ("int8", "int4", "dense"))


def load_dtype(dtype: torch.dtype, fmt: str) -> torch.dtype | None:
    """The dtype to load a model in for format ``fmt`` computing in ``dtype``: the file's own (None)
    for the low-bit formats, which convert each weight from it (see :func:`apply`)."""
    return dtype if fmt == "dense" else None


def check_format(name: str, what: str = "weights") -> str:
    """``name`` if it is a weight format, else a ValueError naming the value and the choices."""
    if name not in FORMATS:
        raise ValueError(f"{what} must be one of {', '.join(FORMATS)}, got {name!r}")
    return name


def int8_rows(w: torch.Tensor, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[n, k]`` as symmetric int8 with one float32 scale per row: (``[n, k]`` int8,
    ``[n, 1]`` scale), converted ``block`` rows at a time (no float32 copy of the whole matrix)."""
    scale = (w.detach().abs().amax(dim=1, keepdim=True).float() / 127).clamp(min=1e-12)  # [n, 1]
    q = [torch.round(w[i:i + block].detach().float() / scale[i:i + block]).clamp(-127, 127).to(torch.int8)
         for i in range(0, w.shape[0], block)]
    return torch.cat(q), scale


class Int8Linear(torch.nn.Module):
    """``y = x W^T + b`` with W int8 per output channel and x quantised to int8 per row.

    Buffers: ``weight`` ``[out, in]`` int8, ``scale`` ``[out]`` float32, ``bias`` ``[out]`` or None.
    """

    fmt = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        q, scale = int8_rows(weight)  # [out, in], [out, 1]
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale[:, 0])  # [out]
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32, copy=True))
        self.out_features, self.in_features = q.shape

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
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16, copy=True))
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


class Int8Embedding(torch.nn.Module):
    """An embedding table stored int8, one scale per token row (the low-bit formats' embedding: a
    lookup reads one row, so int8 rows cost nothing at run time and halve a bf16 table).

    Buffers: ``weight`` ``[vocab, hidden]`` int8, ``scale`` ``[vocab, 1]`` float32.
    """

    fmt = "int8"

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dtype = dtype or weight.dtype  # of the rows it returns
        q, scale = int8_rows(weight)  # [vocab, hidden], [vocab, 1]
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight[ids].float() * self.scale[ids]).to(self.dtype)  # [..., hidden]


_KINDS = {"int8": Int8Linear, "int4": Int4Linear}


def convert(layer: torch.nn.Linear, fmt: str) -> torch.nn.Module:
    """``layer`` in format ``fmt`` (``dense`` returns it unchanged)."""
    if fmt == "dense":
        return layer
    with torch.no_grad():
        return _KINDS[fmt](layer.weight, layer.bias)


def format_of(layer: torch.nn.Module) -> str:
    return getattr(layer, "fmt", "dense")


#: Bytes read between timed calls so that a probed layer's weights come from memory, not the cache
#: (a model's layers do not fit in the cache; a probe that loops over one layer would).
EVICT_BYTES = 96 << 20


def _seconds(layer: torch.nn.Module, x: torch.Tensor, scratch: torch.Tensor) -> float:
    layer(x)  # warm: first calls allocate and pick kernels
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        scratch.add_(1)  # evicts the layer's weights from the caches
        t0 = time.perf_counter()
        layer(x)
        best = min(best, time.perf_counter() - t0)
    return best


def candidates(out_features: int, in_features: int, preference: tuple[str, ...]) -> tuple[str, ...]:
    """The formats of ``preference`` a ``[out, in]`` layer can take, in that order."""
    fits = {"int8": True, "int4": Int4Linear.fits(out_features, in_features), "dense": True}
    return tuple(f for f in preference if fits[f])


@functools.lru_cache(maxsize=None)
def _choose_shape(out_features: int, in_features: int, work: Workload, dtype: torch.dtype, bias: bool) -> str:
    formats = candidates(out_features, in_features, work.preference)  # of the real shape
    out_features = min(out_features, PROBE_MAX_OUT)  # the kernels scale with the outputs; LM heads are huge
    probe = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device="meta")
    probe.weight = torch.nn.Parameter(torch.randn(out_features, in_features, dtype=dtype) * 0.02, False)
    if bias:
        probe.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype), False)
    x = {m: torch.randn(m, in_features, dtype=dtype) for m, _ in work.rows}  # [m, in]
    scratch = torch.zeros(EVICT_BYTES // 4)
    times = {}
    with torch.no_grad():
        for fmt in formats:
            layer = convert(probe, fmt)
            times[fmt] = sum(n * _seconds(layer, x[m], scratch) for m, n in work.rows)
    best = next(iter(times))
    for fmt, t in times.items():
        if t * GAIN <= times[best]:
            best = fmt
    return best


def choose(layer: torch.nn.Linear, fmt: str, work: Workload, dtype: torch.dtype | None = None) -> str:
    """The format ``layer`` takes: ``fmt`` itself where the layer's shape fits it (else ``dense``);
    for ``auto``, ``dense`` below :data:`MIN_WEIGHTS` weights (nothing to win) and otherwise the
    format that runs ``work`` fastest with activations in ``dtype``
    (default: the weight's; timed once per process, shape, work and dtype)."""
    out_f, in_f = layer.out_features, layer.in_features
    if fmt == "dense" or layer.weight.device.type != "cpu":
        return "dense"
    if fmt == "auto":
        if layer.weight.numel() < MIN_WEIGHTS:
            return "dense"
        return _choose_shape(out_f, in_f, work, dtype or layer.weight.dtype, layer.bias is not None)
    return fmt if fmt in candidates(out_f, in_f, (fmt,)) else "dense"


def apply(module: torch.nn.Module, fmt: str, work: Workload, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Converts, in place, every ``nn.Linear`` of ``module`` to its chosen format (:func:`choose`),
    and with a low-bit format a large embedding table to :class:`Int8Embedding`; the dense
    originals are dropped. Then every parameter left (norms, dense layers) is cast to ``dtype``, the
    dtype the model computes in, and float32 layers left dense go to oneDNN where it is faster
    (:func:`cpu_linear.use_onednn`). Returns how many layers took each format.

    A model meant for a low-bit format is best loaded in its file's own dtype (``hf.load_stage``
    with ``dtype=None``): each weight is read once, converted, and dropped; no dense copy in the
    compute dtype is ever made.

    Args:
        module: a loaded model (inference only).
        fmt: one of :data:`FORMATS`.
        work: the worker's typical request for ``auto`` (:data:`DRAFT_WORK`, :data:`STAGE_WORK`).
        dtype: the compute dtype (None: the parameters' own).
    """
    check_format(fmt)
    counts: dict[str, int] = {}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Embedding and fmt != "dense" and (
                    fmt != "auto" or child.weight.numel() >= MIN_WEIGHTS):
                with torch.no_grad():
                    setattr(parent, name, Int8Embedding(child.weight, dtype))
                counts["int8 embedding"] = counts.get("int8 embedding", 0) + 1
            if type(child) is not torch.nn.Linear:
                continue
            chosen = choose(child, fmt, work, dtype)
            if chosen != "dense":
                setattr(parent, name, convert(child, chosen))
            counts[chosen] = counts.get(chosen, 0) + 1
    if dtype is not None or set(counts) - {"dense"}:
        _own_memory(module, dtype)
    cpu_linear.use_onednn(module)
    release_freed_memory()
    return counts


def _own_memory(module: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Copies the parameters left (norms, any dense layer) out of the weights file, in ``dtype``: a
    loaded tensor maps its file, and while one does, the file's pages that conversion read stay
    resident."""
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.to(dtype or p.dtype, copy=True)
