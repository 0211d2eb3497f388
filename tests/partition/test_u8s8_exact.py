"""`CpuCaps.u8s8_exact` against the machine: int8-rows' GEMM (ORT's DynamicQuantizeMatMul, MLAS
u8s8) computes exactly where the flags say so, and saturates where they say it does not."""

from __future__ import annotations

import pytest

from mirror_sd.devices.cpu_caps import host_caps
from mirror_sd.devices.u8s8_probe import u8s8_ratio
from mirror_sd.graphs.row_quant import ROWS_QMAX
from mirror_sd.partition.precision import (
    CpuCaps,
    choose_prefill_quantize,
    choose_quantize,
    rows_gemm_warning,
)


def test_weights_up_to_64_are_exact_on_every_cpu():
    assert u8s8_ratio(1) == pytest.approx(1, rel=1e-6)
    assert u8s8_ratio(64) == pytest.approx(1, rel=1e-6)


def test_the_flags_predict_whether_full_range_weights_are_exact_here():
    caps = host_caps()
    exact = u8s8_ratio(ROWS_QMAX) == pytest.approx(1, rel=1e-6)
    assert exact == caps.u8s8_exact, (
        f"{caps.model}: u8s8 GEMM {'exact' if exact else 'saturates'} at |w| = {ROWS_QMAX}, "
        f"but U8S8_EXACT_FLAGS say {'exact' if caps.u8s8_exact else 'saturates'}"
    )
    assert (rows_gemm_warning("devices.tgt.quantize", caps) is None) == exact


def test_auto_keeps_int8_rows_off_cpus_whose_gemm_saturates():
    avx512_no_vnni = CpuCaps("Skylake-X", frozenset({"avx2", "avx512f", "avx512bw"}))
    choice = choose_prefill_quantize("int4", avx512_no_vnni)
    assert choice.value == "int7-rows" and "saturates beyond" in choice.reason
    assert choose_quantize("int4", avx512_no_vnni).value == "int7-rows"
    why = rows_gemm_warning("devices.drf.prefill_quantize", avx512_no_vnni)
    assert "devices.drf.prefill_quantize" in why and "prefill_quantize: int7-rows" in why
    assert "quantize: int7-rows" in rows_gemm_warning("devices.t.quantize", avx512_no_vnni)
