"""bf16 detection (actors/hardware.py) on sample /proc/cpuinfo texts, the combination rule, this machine."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specmesh.actors import hardware, hf


def _x86(model: str, flags: str) -> str:
    """Two processor entries, as Linux writes them; the second must not override the first."""
    entry = (
        "processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\n"
        "flags\t\t: {flags}\nbugs\t\t: spectre_v1\n\n"
    )
    return entry.format(i=0, model=model, flags=flags) + entry.format(i=1, model="other", flags="fpu")


BASE = "fpu vme sse sse2 ssse3 sse4_1 sse4_2 fma avx f16c"
AVX2_ONLY = _x86("Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz", f"{BASE} avx2 bmi2")
AVX512_NO_BF16 = _x86("Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz", f"{BASE} avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni")
AVX512_BF16 = _x86("AMD EPYC", f"{BASE} avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni")
AMX = _x86("Intel(R) Xeon(R) Platinum 8480+", f"{BASE} avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8")
ARM_NO_BF16 = (
    "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd0c\n\n"
)
ARM_BF16 = (
    "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd aes sha2 crc32 atomics sve i8mm bf16 svebf16\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd40\n\n"
)


@pytest.mark.parametrize(
    ("text", "arch", "native"),
    [
        (AVX2_ONLY, "x86", False),
        (AVX512_NO_BF16, "x86", False),
        (AVX512_BF16, "x86", True),
        (AMX, "x86", True),
        (ARM_NO_BF16, "arm", False),
        (ARM_BF16, "arm", True),
    ],
    ids=["avx2-only", "avx512-no-bf16", "avx512-bf16", "amx", "arm-no-bf16", "arm-bf16"],
)
def test_flags_decide_native_bf16(text, arch, native):
    info = hardware.parse_cpuinfo(text)
    assert info.arch == arch
    assert hardware.flags_native_bf16(info) is native


def test_parse_reads_first_entry_model_and_flags():
    info = hardware.parse_cpuinfo(AVX512_BF16)
    assert info.model_name == "AMD EPYC"
    assert {"avx512_bf16", "avx2", "fpu"} <= info.flags
    assert "spectre_v1" not in info.flags  # 'bugs' is not 'flags'
    arm = hardware.parse_cpuinfo(ARM_BF16)
    assert arm.model_name == "ARM implementer 0x41 part 0xd40"
    assert "svebf16" in arm.flags


def test_unknown_flags_when_cpuinfo_missing_or_foreign(tmp_path: Path):
    assert hardware.read_cpuinfo(tmp_path / "absent") is None
    assert hardware.flags_native_bf16(None) is None
    foreign = hardware.parse_cpuinfo("processor : 0\ncpu : POWER9\n")
    assert foreign.arch == "unknown" and hardware.flags_native_bf16(foreign) is None
    p = tmp_path / "cpuinfo"
    p.write_text(AMX)
    assert hardware.flags_native_bf16(hardware.read_cpuinfo(p)) is True


@pytest.mark.parametrize(
    ("flags", "onednn", "native"),
    [
        (True, True, True),
        (True, False, False),  # torch without (or with disabled) oneDNN: generic slow kernels
        (False, True, False),  # AVX512 without bf16: oneDNN says yes but emulates
        (False, False, False),
        (None, True, False),  # flags unreadable: float32, the safe side
        (None, False, False),
    ],
)
def test_combination_rule(flags, onednn, native):
    assert hardware.combine(flags, onednn) is native


def test_onednn_disabled_means_no(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert hardware.onednn_bf16() is False


@pytest.mark.parametrize(("text", "dtype"), [(AVX2_ONLY, torch.float32), (AVX512_NO_BF16, torch.float32),
                                            (AVX512_BF16, torch.bfloat16), (AMX, torch.bfloat16)])
def test_auto_dtype_follows_the_cpu_flags(monkeypatch, tmp_path, text, dtype):
    p = tmp_path / "cpuinfo"
    p.write_text(text)
    monkeypatch.setattr(hardware, "CPUINFO_PATH", p)
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: True)
    assert hf.resolve_dtype("auto") == dtype


def _grep_cpuinfo(flag: str) -> bool:
    """``grep -o FLAG /proc/cpuinfo``, independently of the code under test."""
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def test_this_machine_auto_matches_its_flags():
    """On the development machine (AMD EPYC with avx512_bf16) this asserts bfloat16; on an AVX2-only
    CI machine it asserts float32. Never skipped."""
    native = (_grep_cpuinfo("avx512_bf16") or _grep_cpuinfo("amx_bf16")) and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    assert hardware.native_bf16() is native
    assert hf.resolve_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    summary = hardware.cpu_summary()
    assert ("bf16 native" in summary) is native
    assert ("avx512_bf16" in summary) is _grep_cpuinfo("avx512_bf16")


def test_cpu_summary_names_model_flags_and_verdict(monkeypatch, tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text(AVX2_ONLY)
    monkeypatch.setattr(hardware, "CPUINFO_PATH", p)
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: False)
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 3)
    assert hardware.cpu_summary() == (
        "Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz, 3 CPUs, avx2, bf16 not native (flags no, oneDNN no)"
    )
    monkeypatch.setattr(hardware, "CPUINFO_PATH", tmp_path / "absent")
    assert hardware.cpu_summary().startswith("unknown CPU, 3 CPUs, no flags read, bf16 not native (flags unknown")


def test_explicit_dtypes_and_bad_name():
    assert hf.resolve_dtype("float32") == torch.float32
    assert hf.resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="'fp8'"):
        hf.resolve_dtype("fp8")
