"""The hardware probe: fp32 paths without native bf16, the bf16 path with it (probe injected, no timing)."""

from __future__ import annotations

import pytest

from experts.hardware import parse_cpuinfo

AVX2_CPU = "processor : 0\nmodel name : AMD EPYC 7B12\nflags : fpu sse2 avx avx2 fma f16c\n"
BF16_CPU = "processor : 0\nmodel name : AMD EPYC 9B14\nflags : fpu avx avx2 fma f16c avx512f avx512_bf16\n"


@pytest.mark.parametrize(
    ("text", "env", "native", "kind"),
    [
        (AVX2_CPU, {}, False, "avx2"),
        (BF16_CPU, {}, True, "bf16"),
        (BF16_CPU, {"ATEN_CPU_CAPABILITY": "avx2"}, False, "avx2"),  # the AVX2 imitation
        (BF16_CPU, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False, "avx2"),
        (BF16_CPU, {"ATEN_CPU_CAPABILITY": "avx512"}, True, "bf16"),
        ("", {}, False, "other"),
    ],
)
def test_probe_reads_flags_and_caps(text, env, native, kind):
    info = parse_cpuinfo(text, env)
    assert info.native_bf16 is native
    assert info.kind == kind


def test_reported_flags_keep_their_order():
    assert parse_cpuinfo(BF16_CPU, {}).reported_flags() == ["avx2", "fma", "f16c", "avx512f", "avx512_bf16"]
    assert parse_cpuinfo(BF16_CPU, {}).model == "AMD EPYC 9B14"


@pytest.mark.parametrize(("cpu", "expected"), [(AVX2_CPU, "float32"), (BF16_CPU, "bfloat16")])
def test_training_and_router_dtypes_follow_the_probe(monkeypatch, cpu, expected):
    import torch

    import experts.hardware as hardware
    from experts.base_model import pick_dtype
    from router.encoder import encoder_dtype

    monkeypatch.setattr(hardware, "cpu_info", lambda: parse_cpuinfo(cpu, {}))
    assert pick_dtype("auto", "cpu") == getattr(torch, expected)
    assert encoder_dtype() == getattr(torch, expected)
    assert pick_dtype("fp32", "cpu") == torch.float32
