"""What this CPU computes natively: the bf16 decision behind dtype "auto", and a one-line CPU summary.

Why it matters: on an AVX2-only CPU bf16 matrix products are emulated and their cost grows with the
token count (one forward of the 1.5B target over 16 new tokens: 3984 ms in bf16, 1276 ms in fp32), so
bf16 there makes verifying a round as dear as decoding its tokens; on a CPU with AVX512-BF16 the same
forward is 2-4x *faster* in bf16 than in fp32 (342 vs 1309 ms). Getting "auto" wrong costs 2-4x either way.

Two sources, both required (:func:`combine`):

- **The CPU's own flags** (``/proc/cpuinfo``): ``avx512_bf16`` or ``amx_bf16`` on x86, ``bf16`` on
  ARM. They say whether bf16 dot products exist in hardware.
- **oneDNN** (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, with oneDNN available and enabled):
  whether torch's bf16 matrix products run through oneDNN's kernels at all. Without it they fall back
  to generic kernels that are slow whatever the CPU.

Neither alone is enough. oneDNN's check is only "AVX512 BW+VL+DQ" on x86, true on AVX512 CPUs
without bf16 instructions (Skylake-SP, Cascade Lake), where oneDNN emulates bf16 through fp32; the
flags alone miss a torch built or run without oneDNN. Where the flags cannot be read (no
``/proc/cpuinfo``: not Linux), the answer is "not native" (float32): fp32 is never the catastrophic
choice, and it keeps greedy decoding exactly reproducible. ``torch.backends.cpu.get_cpu_capability()``
is not used: it reports ``AVX512`` on a CPU that has ``avx512_bf16``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Where Linux describes the CPU.
CPUINFO_PATH = Path("/proc/cpuinfo")
#: x86 flags of native bf16 arithmetic (AVX512-BF16 dot products; AMX tiles with bf16).
X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
#: ARM ``Features`` of native bf16 arithmetic (Armv8.6 BF16: BFDOT, BFMMLA).
ARM_BF16_FEATURES = frozenset({"bf16"})
#: Flags worth naming in a benchmark summary, in the order printed.
SUMMARY_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "sve", "bf16")


@dataclass(frozen=True)
class CpuInfo:
    """The part of ``/proc/cpuinfo`` that matters here, from its first processor entry.

    Attributes:
        model_name: ``model name`` (x86), or the implementer/part ids on ARM; "" if absent.
        flags: ``flags`` (x86) or ``Features`` (ARM), lower case.
        arch: ``"x86"`` (a ``flags`` line), ``"arm"`` (a ``Features`` line) or ``"unknown"``.
    """

    model_name: str
    flags: frozenset[str]
    arch: str


def parse_cpuinfo(text: str) -> CpuInfo:
    """Parse the text of ``/proc/cpuinfo`` (x86 or ARM layout); the first entry of each key wins."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    if "flags" in fields:
        arch, flags = "x86", fields["flags"]
    elif "features" in fields:
        arch, flags = "arm", fields["features"]
    else:
        arch, flags = "unknown", ""
    name = fields.get("model name", "")
    if not name and "cpu implementer" in fields:
        name = f"ARM implementer {fields['cpu implementer']} part {fields.get('cpu part', '?')}"
    return CpuInfo(model_name=name, flags=frozenset(flags.lower().split()), arch=arch)


def read_cpuinfo(path: Path | None = None) -> CpuInfo | None:
    """This machine's :class:`CpuInfo` (from ``path``, default :data:`CPUINFO_PATH`), or None where
    it cannot be read (not Linux)."""
    path = path if path is not None else CPUINFO_PATH
    try:
        return parse_cpuinfo(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None


def flags_native_bf16(info: CpuInfo | None) -> bool | None:
    """Whether the CPU flags name native bf16 arithmetic; None when they are unknown."""
    if info is None or info.arch == "unknown":
        return None
    wanted = X86_BF16_FLAGS if info.arch == "x86" else ARM_BF16_FEATURES
    return bool(info.flags & wanted)


def onednn_bf16() -> bool:
    """Whether torch runs bf16 matrix products through oneDNN here (available, enabled, supported)."""
    import torch

    mkldnn = torch.backends.mkldnn
    if not (mkldnn.is_available() and mkldnn.enabled):
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def combine(flags: bool | None, onednn: bool) -> bool:
    """The rule: native bf16 iff the flags name it *and* oneDNN will use it (module docstring)."""
    return flags is True and onednn


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively, so that bf16 is the faster dtype here."""
    return combine(flags_native_bf16(read_cpuinfo()), onednn_bf16())


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_summary() -> str:
    """One line for benchmark summaries: model, usable CPUs, the flags that matter, the bf16 verdict.

    E.g. ``AMD EPYC, 2 CPUs, avx2 avx512f avx512_bf16, bf16 native (flags yes, oneDNN yes)``.
    """
    info = read_cpuinfo()
    flags, onednn = flags_native_bf16(info), onednn_bf16()
    name = (info.model_name if info else "") or "unknown CPU"
    shown = " ".join(f for f in SUMMARY_FLAGS if info and f in info.flags) or "no flags read"
    verdict = "native" if combine(flags, onednn) else "not native"
    flag_word = {True: "yes", False: "no", None: "unknown"}[flags]
    return (
        f"{name}, {usable_cpus()} CPUs, {shown}, bf16 {verdict} "
        f"(flags {flag_word}, oneDNN {'yes' if onednn else 'no'})"
    )
