"""`quantize: auto` / `dtype: auto`: the checkpoint's precision where the hardware runs it
natively, fp32 elsewhere (partition/precision.py), with the CPU's capabilities mocked."""

from __future__ import annotations

import json

import pytest

from mirror_sd.graphs.checkpoint import checkpoint_precision, gguf_precision
from mirror_sd.partition.precision import (
    CpuCaps,
    choose_dtype,
    choose_prefill_quantize,
    choose_quantize,
    choose_torch_quantize,
    dtype_for_quantized,
)

AMX_XEON = CpuCaps("Intel Xeon (AMX)", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16",
                                                 "amx_int8", "amx_bf16", "avx512_fp16"}))  # fmt: skip
AVX2_EPYC = CpuCaps("AMD EPYC (AVX2)", frozenset({"avx", "avx2", "fma", "f16c"}))
OLD_X86 = CpuCaps("SSE4 only", frozenset({"sse4_1", "sse4_2"}))
ARM_DOT = CpuCaps("Neoverse", frozenset({"asimd", "asimddp"}))


@pytest.mark.parametrize(
    ("caps", "expected", "why"),
    [(AMX_XEON, "int4", "amx_int8"), (AVX2_EPYC, "int4", "avx2"), (ARM_DOT, "int4", "asimddp"),
     (OLD_X86, "none", "no integer dot-product")],
)  # fmt: skip
def test_a_4_bit_checkpoint_stays_4_bit_where_integer_kernels_exist(caps, expected, why):
    choice = choose_quantize("int4", caps, role="draft")
    assert (choice.key, choice.value) == ("quantize", expected)
    assert why in choice.reason


@pytest.mark.parametrize(
    ("caps", "expected"),
    [(AMX_XEON, "int8-rows"), (AVX2_EPYC, "int7-rows"), (ARM_DOT, "int4"), (OLD_X86, "none")],
)
def test_a_4_bit_target_runs_int8_rows_with_avx512_vnni_and_int7_rows_with_avx2(caps, expected):
    choice = choose_quantize("int4", caps)  # the target's device
    assert choice.value == expected
    if expected == "int8-rows":
        assert "avx512_vnni" in choice.reason and "closer to the checkpoint" in choice.reason
    if expected == "int7-rows":
        assert "avx2" in choice.reason and "[-64, 64]" in choice.reason
    assert choose_quantize("int8", caps).value == ("int8" if caps.int8_dot else "none")


def test_an_8_bit_checkpoint_is_int8_and_a_float_one_stays_fp32_on_ort():
    assert choose_quantize("int8", AVX2_EPYC).value == "int8"
    for checkpoint in ("float32", "bfloat16", "float16"):
        choice = choose_quantize(checkpoint, AMX_XEON)
        assert choice.value == "none" and checkpoint in choice.reason


@pytest.mark.parametrize(
    ("checkpoint", "device", "caps", "expected"),
    [("bfloat16", "cpu", AMX_XEON, "bfloat16"), ("bfloat16", "cpu", AVX2_EPYC, "float32"),
     ("float16", "cpu", AMX_XEON, "float16"), ("float16", "cpu", AVX2_EPYC, "float32"),
     ("bfloat16", "cuda:0", None, "bfloat16"), ("float32", "cuda:0", None, "float32"),
     ("int4", "cpu", AMX_XEON, "float32")],
)  # fmt: skip
def test_torch_dtype_auto_follows_the_checkpoint_where_native(checkpoint, device, caps, expected):
    choice = choose_dtype(checkpoint, device, caps)
    assert (choice.key, choice.value) == ("dtype", expected)
    assert choice.describe().startswith(f"dtype: auto -> {expected} (")


def test_an_unknown_checkpoint_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="checkpoint precision 'fp8'"):
        choose_quantize("fp8", AMX_XEON)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "int4"), ("SmolLM2-135M-Instruct.Q4_1.gguf", "int4"),
     ("model-IQ4_XS.gguf", "int4"), ("model-Q8_0.gguf", "int8"), ("model.q6_k.gguf", "int8"),
     ("model-bf16.gguf", "bfloat16"), ("model-f16.gguf", "float16"), ("model.gguf", "float32")],
)  # fmt: skip
def test_gguf_type_from_the_file_name(name, expected):
    assert gguf_precision(name) == expected


def test_a_fetched_folder_reports_its_gguf_and_a_plain_folder_its_config(tmp_path):
    fetched, plain, bare = tmp_path / "fetched", tmp_path / "plain", tmp_path / "bare"
    for f in (fetched, plain, bare):
        f.mkdir()
    (fetched / "config.json").write_text(json.dumps({"dtype": "float32"}))
    (fetched / "mirror_sd_fetch.json").write_text(json.dumps({"gguf_file": "m-q4_k_m.gguf"}))
    (plain / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    (bare / "config.json").write_text("{}")
    assert [checkpoint_precision(f) for f in (fetched, plain, bare)] == [
        "int4", "bfloat16", "float32"]  # fmt: skip


def test_host_caps_reads_the_flags_of_this_machine():
    from mirror_sd.devices.cpu_caps import host_caps

    caps = host_caps()
    assert caps.model and isinstance(caps.flags, frozenset)
    assert caps.int8_dot is None or caps.int8_dot in caps.flags


def test_torch_quantize_auto_needs_native_bf16_activations():
    assert choose_torch_quantize("int4", "cpu", AMX_XEON).value == "int4"
    assert choose_torch_quantize("int8", "cpu", AMX_XEON).value == "int8"
    no = choose_torch_quantize("int4", "cpu", AVX2_EPYC)
    assert no.value == "none" and "bfloat16" in no.reason
    assert choose_torch_quantize("int4", "cuda:0", None).value == "none"
    assert choose_torch_quantize("float32", "cpu", AMX_XEON).value == "none"
    assert dtype_for_quantized("int4", AMX_XEON).value == "bfloat16"
    assert dtype_for_quantized("int4", AVX2_EPYC).value == "float32"


def test_a_torch_device_takes_quantize_on_the_cpu_only():
    from mirror_sd.partition import DeviceMapError, load_device_map

    text = """
version: 1
devices:
  t: {backend: torch, device: %s, quantize: int4}
placement: {target: t}
"""
    assert load_device_map(text % "cpu").devices["t"].quantize == "int4"
    with pytest.raises(DeviceMapError, match="quantize"):
        load_device_map(text % "cuda:0")


@pytest.mark.parametrize(
    ("quantize", "caps", "expected"),
    [("int4", AVX2_EPYC, "int7-rows"), ("int4", AMX_XEON, "int8-rows"), ("int4", OLD_X86, "none"),
     ("int4", ARM_DOT, "int8-rows"),
     ("int8", AMX_XEON, "none"), ("none", AVX2_EPYC, "none")],
)  # fmt: skip
def test_prefill_auto_runs_an_int4_draft_prompt_through_int8_rows(quantize, caps, expected):
    choice = choose_prefill_quantize(quantize, caps)
    assert choice.value == expected and choice.key == "prefill_quantize"
    assert choice.describe().startswith(f"prefill_quantize: auto -> {expected} (")
