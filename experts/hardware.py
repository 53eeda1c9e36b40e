"""What this machine can do fast: one probe that training, routing, serving and benchmarks share.

CPUs differ: some have native bf16 (AVX512-BF16 or AMX), many only AVX2/FMA, where bf16 is
emulated and slower than fp32. Every "bf16 or fp32?" decision in the project asks `native_bf16()`.

An AVX2 machine can be imitated on a bf16 one for measurements (`AVX2_ENV`: torch's own kernels,
oneDNN and MKL capped at AVX2); the probe honours those caps, so the imitation takes the fp32 paths
a real AVX2 machine takes. Memory bandwidth is not imitated: say so beside any such figure.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Environment that makes torch behave as on an AVX2-only CPU (for benchmarks; never set by default).
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

# The flags that decide our kernels, in the order benchmarks print them.
REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class CpuInfo:
    """The parts of /proc/cpuinfo (and of the torch environment caps) our kernel choices read."""

    model: str
    flags: frozenset[str]
    capped_to_avx2: bool = False  # ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA limit torch to AVX2

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run natively (AVX512-BF16 or AMX) and nothing caps torch below them."""
        return not self.capped_to_avx2 and bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def kind(self) -> str:
        """'bf16' or 'avx2' (or 'other'): the two kinds of CPU our figures are reported for."""
        if self.native_bf16:
            return "bf16"
        return "avx2" if "avx2" in self.flags else "other"

    def reported_flags(self) -> list[str]:
        return [f for f in REPORTED_FLAGS if f in self.flags]


def _capped_to_avx2(env: dict[str, str]) -> bool:
    aten = env.get("ATEN_CPU_CAPABILITY", "").lower()
    onednn = env.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return aten in ("avx2", "default") or onednn.startswith(("AVX2", "AVX", "SSE"))


def parse_cpuinfo(text: str, env: dict[str, str] | None = None) -> CpuInfo:
    """A CpuInfo from the text of /proc/cpuinfo (the first processor's model and flags)."""
    model, flags = "unknown", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuInfo(
        model=model, flags=flags, capped_to_avx2=_capped_to_avx2(dict(os.environ if env is None else env))
    )


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CpuInfo (cached: the flags do not change while a process runs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text)


def native_bf16() -> bool:
    """Whether bf16 compute beats fp32 on this CPU (True only with native bf16 instructions)."""
    return cpu_info().native_bf16


def read_bandwidth_gb_s(repeats: int = 5, mib: int = 512) -> float:
    """Measured memory read bandwidth: torch summing a `mib` MiB fp32 tensor at the current thread
    count, median of `repeats`. Batch-1 decoding reads every weight once a token, so
    tokens/s <= this / weight bytes."""
    import torch

    data = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times) / 1e9


def machine_report(bandwidth: bool = True) -> dict[str, object]:
    """What every benchmark writes beside its figures: CPU model, kind, flags, cores, bandwidth."""
    import platform

    import torch

    info = cpu_info()
    report: dict[str, object] = {
        "cpu": info.model,
        "cpu_kind": info.kind,
        "cpu_flags": info.reported_flags(),
        "capped_to_avx2": info.capped_to_avx2,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_at_start": os.getloadavg(),
    }
    if bandwidth:
        report["read_gb_s"] = round(read_bandwidth_gb_s(), 1)
    return report
