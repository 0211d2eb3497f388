"""Device maps: schema v1 loading, exact error messages, YAML round trip, the examples."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from mirror_sd.partition import (
    DeviceMap,
    DeviceMapError,
    OrtSpec,
    SimSpec,
    SpecConfig,
    TorchSpec,
    load_device_map,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "device_maps"

BASE = {
    "version": 1,
    "devices": {
        "gpu": {"backend": "torch", "device": "cuda:0", "dtype": "bfloat16"},
        "npu": {
            "backend": "onnxruntime",
            "providers": [
                {"OpenVINOExecutionProvider": {"device_type": "NPU"}},
                "CPUExecutionProvider",
            ],
        },
        "sim": {"backend": "sim", "profile": "profiles/npu.json"},
    },
    "placement": {"target": "gpu", "draft": "npu"},
    "speculation": {"num_draft_tokens": 3, "exit_layer": "auto"},
}


def test_loads_into_frozen_dataclasses_with_defaults():
    m = load_device_map(BASE)
    assert m.devices["gpu"] == TorchSpec("gpu", device="cuda:0", dtype="bfloat16", threads=None)
    assert m.devices["npu"] == OrtSpec(
        "npu",
        providers=(
            ("OpenVINOExecutionProvider", {"device_type": "NPU"}),
            ("CPUExecutionProvider", {}),
        ),
        intra_op_threads=None,
        inter_op_threads=None,
        optimization_level="all",
        allow_fallback=False,
        quantize="none",
    )
    assert m.devices["sim"] == SimSpec("sim", profile="profiles/npu.json")
    assert m.placement == {"target": "gpu", "draft": "npu"}
    assert m.speculation == SpecConfig(num_draft_tokens=3)
    with pytest.raises(AttributeError):
        m.speculation = SpecConfig()  # type: ignore[misc]


def test_defaults_come_from_spec_config_and_ort_provider_default():
    m = load_device_map(
        {"version": 1, "devices": {"x": {"backend": "onnxruntime"}}, "placement": {"draft": "x"}}
    )
    assert m.speculation == SpecConfig()
    assert m.devices["x"].providers == (("CPUExecutionProvider", {}),)
    assert m.to_dict()["speculation"]["num_draft_tokens"] == SpecConfig().num_draft_tokens


def test_round_trip_dict_yaml_and_file(tmp_path):
    m = load_device_map(BASE)
    d = m.to_dict()
    assert d["devices"]["npu"]["providers"] == [
        {"OpenVINOExecutionProvider": {"device_type": "NPU"}},
        {"CPUExecutionProvider": {}},
    ]
    assert load_device_map(d) == m
    assert load_device_map(m.to_yaml()) == m
    assert load_device_map(m.to_yaml()).to_dict() == d
    m.dump(tmp_path / "plan.yaml")
    again = load_device_map(tmp_path / "plan.yaml")
    assert again == m and again.to_dict() == d
    assert again.source == str(tmp_path / "plan.yaml")
    assert again.resolve("profiles/npu.json") == tmp_path / "profiles" / "npu.json"


def test_int_temperature_is_normalized_to_float():
    m = load_device_map({**BASE, "speculation": {"temperature": 1}})
    assert m.speculation.temperature == 1.0 and isinstance(m.speculation.temperature, float)


def _with(path: str, value):
    """BASE with the value at dotted `path` replaced (value DELETE removes the key)."""
    d = copy.deepcopy(BASE)
    *parents, last = path.split("/")
    node = d
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return d


DELETE = object()

MALFORMED = [
    (
        _with("version", 2),
        "device map: version: 2 is not supported; this mirror-sd reads version 1",
    ),
    (_with("version", DELETE), "version: missing; write `version: 1` at the top of the map"),
    (
        _with("placements", {}),
        "placements: unknown key; did you mean 'placement'? valid top-level keys: version, devices, placement, speculation",
    ),
    (
        _with("devices", {}),
        "devices: must be a non-empty mapping alias -> {backend: torch | onnxruntime | sim, ...}, got an empty mapping",
    ),
    (
        _with("devices/gpu/backend", "tensorflow"),
        "devices.gpu.backend: unknown backend 'tensorflow'; valid backends: torch, onnxruntime, sim",
    ),
    (
        _with("devices/gpu/backend", DELETE),
        "devices.gpu.backend: missing; valid backends: torch, onnxruntime, sim",
    ),
    (
        _with("devices/gpu/providers", []),
        "devices.gpu.providers: unknown key; valid keys for torch devices: backend, device, dtype, threads",
    ),
    (
        _with("devices/npu/intra_op_thread", 1),
        "devices.npu.intra_op_thread: unknown key; did you mean 'intra_op_threads'? valid keys for onnxruntime devices: backend, providers, intra_op_threads, inter_op_threads, optimization_level, allow_fallback, quantize",
    ),
    (
        _with("devices/gpu/device", "gpu0"),
        "devices.gpu.device: 'gpu0' is not a torch device; valid: cpu, cuda, cuda:N (N = 0, 1, ...), mps",
    ),
    (_with("devices/gpu/device", "cuda:x"), "devices.gpu.device: 'cuda:x' is not a torch device"),
    (
        _with("devices/gpu/dtype", "bf16"),
        "devices.gpu.dtype: unknown value 'bf16'; did you mean 'bfloat16'? valid: float32, float16, bfloat16",
    ),
    (
        _with("devices/gpu/threads", 0),
        "devices.gpu.threads: must be a positive integer or null, got 0",
    ),
    (
        _with("devices/npu/providers/0", {"OpenVinoExecutionProvider": {}}),
        "devices.npu.providers[0]: unknown execution provider 'OpenVinoExecutionProvider'; did you mean 'OpenVINOExecutionProvider'? valid: CPUExecutionProvider, CUDAExecutionProvider, TensorrtExecutionProvider, OpenVINOExecutionProvider, QNNExecutionProvider, CoreMLExecutionProvider, DmlExecutionProvider",
    ),
    (
        _with("devices/npu/providers/1", "cuda"),
        "devices.npu.providers[1]: unknown execution provider 'cuda'; did you mean 'CUDAExecutionProvider'?",
    ),
    (
        _with("devices/npu/providers/0", {"OpenVINOExecutionProvider": ["NPU"]}),
        "devices.npu.providers[0].OpenVINOExecutionProvider: provider options must be a mapping option -> value, got list",
    ),
    (
        _with("devices/npu/providers/0", {"A": {}, "B": {}}),
        "devices.npu.providers[0]: each provider is a name or a one-key mapping `- Name: {option: value}`",
    ),
    (
        _with("devices/npu/providers/0", "CPUExecutionProvider"),
        "devices.npu.providers[1]: CPUExecutionProvider is listed twice; list each provider once",
    ),
    (
        _with("devices/npu/providers", []),
        "devices.npu.providers: must be a non-empty list like `- CPUExecutionProvider: {}`, in priority order",
    ),
    (
        _with("devices/npu/quantize", "int3"),
        "devices.npu.quantize: unknown value 'int3'; did you mean 'int8'? valid: none, int8, int4",
    ),
    (
        _with("devices/npu/prefill_quantize", "int5"),
        "devices.npu.prefill_quantize: unknown value 'int5'; did you mean 'int8'? valid: none, int8, int4",
    ),
    (
        _with("devices/npu/optimization_level", 99),
        "devices.npu.optimization_level: unknown value 99; valid: disable, basic, extended, all",
    ),
    (
        _with("devices/npu/allow_fallback", "yes please"),
        "devices.npu.allow_fallback: must be true or false, got 'yes please'",
    ),
    (
        _with("devices/sim/profile", DELETE),
        "devices.sim.profile: required: the path of a cost profile JSON file, got None",
    ),
    (
        _with("devices/bad alias", {"backend": "torch"}),
        "devices.bad alias: a device alias is letters, digits, '_' or '-', starting with a letter",
    ),
    (
        _with("placement/draft", "npx"),
        "placement[draft]: unknown device alias 'npx'; devices defined: gpu, npu, sim",
    ),
    (
        _with("placement/draft..layers", "npu"),
        "placement[draft..layers]: not a node name, dotted prefix or layer range like `target`, `draft.layers`, `target.layers.3` or `target.layers.[0-14)`",
    ),
    (
        _with("placement", {}),
        "placement: must be a non-empty mapping node-name-or-prefix -> device alias, e.g. `target: gpu`",
    ),
    (
        _with("speculation/exit_layr", 3),
        "speculation.exit_layr: unknown key; did you mean 'exit_layer'? valid keys (SpecConfig fields): mode, num_draft_tokens, exit_layer, exit_top_k, branch_budget, reuse, exit_head, exit_vocab_size, draft_vocab_size, draft_streams, amphista, draft_exits, draft_exit_threshold, tree_siblings, draft_stop, draft_stop_threshold, max_len, draft_timeout_s, draft_retry_rounds, model_draft, retrieval, retrieval_min_match, retrieval_max_ngram, prefix_cache, overlap, overlap_target_cores, temperature, top_k, top_p",
    ),
    (
        _with("speculation/exit_layer", 0),
        "speculation.exit_layer: must be 'auto' or a positive integer, got 0",
    ),
    (
        _with("speculation/mode", "fast"),
        "speculation.mode: 'fast': expected one of mirror, speculative, autoregressive",
    ),
    (
        _with("speculation/temperature", "hot"),
        "speculation.temperature: expected a number, got 'hot'",
    ),
    (
        _with("speculation/num_draft_tokens", True),
        "speculation.num_draft_tokens: expected an integer, got True",
    ),
    (
        _with("speculation/top_p", 2),
        "speculation: temperature must be >= 0, top_p in (0, 1], top_k >= 0 (got 0.0, 2.0, 0)",
    ),
    (
        [1, 2],
        "device map: expected a mapping with keys version, devices, placement, speculation, got list",
    ),
]


@pytest.mark.parametrize("data, message", MALFORMED, ids=[m[1][:40] for m in MALFORMED])
def test_malformed_maps_name_the_key_and_the_fix(data, message):
    with pytest.raises(DeviceMapError) as info:
        load_device_map(data)
    assert message in str(info.value)
    assert str(info.value).startswith("device map")


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "version: 1\ndevices:\n  gpu: {backend: torch\nplacement: {}\n",
            "YAML syntax error at line 4, column 10: expected ',' or '}', but got ':'",
        ),
        (
            "version: 1\ndevices:\n  a: {backend: torch}\n  a: {backend: sim}\n",
            "YAML syntax error at line 4, column 3: duplicate key 'a'",
        ),
        ("version: 1\nversion: 1\n", "duplicate key 'version'"),
    ],
)
def test_yaml_errors_carry_line_numbers(text, message):
    with pytest.raises(DeviceMapError, match="YAML syntax error|duplicate") as info:
        load_device_map(text)
    assert message in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("version: 3\n")
    with pytest.raises(DeviceMapError) as info:
        load_device_map(f)
    assert str(info.value) == (
        f"device map {f}: version: 3 is not supported; this mirror-sd reads version 1"
    )
    assert info.value.path == "version" and info.value.source == str(f)
    with pytest.raises(FileNotFoundError, match="device map file not found"):
        load_device_map(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_load_and_round_trip(path):
    m = load_device_map(path)
    assert isinstance(m, DeviceMap)
    assert set(m.placement) == {"target", "draft"}
    assert all(isinstance(s, (OrtSpec, TorchSpec)) for s in m.devices.values())
    assert m.speculation.exit_layer == "auto"
    assert load_device_map(m.to_yaml()) == m


def test_examples_are_all_present():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert names >= {
        "cpu_cpu.yaml",
        "cuda_ortcuda.yaml",
        "cuda_openvino_npu.yaml",
        "cuda_qnn_htp.yaml",
        "mps_coreml.yaml",
    }
    cpu = load_device_map(EXAMPLES / "cpu_cpu.yaml")
    assert cpu.devices["cpu"] == TorchSpec("cpu", "cpu", "float32", None)
    assert cpu.devices["ortcpu"].providers == (("CPUExecutionProvider", {}),)
    assert cpu.devices["ortcpu"].intra_op_threads is None  # the thread budget decides
    assert cpu.devices["ortcpu"].quantize == "int8"
    # the packaged default map (what compile() uses without a map) is ort_ort_cpu.yaml: one
    # file, which the example links to (no copy to keep equal)
    packaged = EXAMPLES.parents[1] / "mirror_sd" / "device_maps" / "default.yaml"
    example = EXAMPLES / "ort_ort_cpu.yaml"
    assert example.is_symlink() and example.resolve() == packaged.resolve()


def test_reference_doc_lists_every_spec_config_default():
    doc = (EXAMPLES.parents[1] / "docs" / "device_map.md").read_text()
    rows = {
        line.split("|")[1].strip(" `"): line for line in doc.splitlines() if line.startswith("| `")
    }
    for name, value in asdict(SpecConfig()).items():
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        assert name in rows, f"docs/device_map.md has no row for speculation.{name}"
        assert rows[name].split("|")[3].strip(" `") == shown, f"default of {name} differs"


def test_partition_never_imports_onnxruntime():
    code = "import sys, mirror_sd.partition; sys.exit('onnxruntime' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_layer_range_key_places_each_layer_of_a_half_open_range():
    text = """
version: 1
devices: {a: {backend: torch}, b: {backend: torch}}
placement:
  target: a
  target.layers.[2-5): b
"""
    dm = load_device_map(text)
    assert dict(dm.placement) == {
        "target": "a",
        "target.layers.2": "b",
        "target.layers.3": "b",
        "target.layers.4": "b",
    }
    assert load_device_map(dm.to_yaml()) == dm  # dumped expanded; loads back equal
    with pytest.raises(
        DeviceMapError, match=r"placement\[target.layers.\[3-3\)\]: empty layer range"
    ):
        load_device_map(text.replace("[2-5)", "[3-3)"))
    twice = text + "  target.layers.3: a\n"
    with pytest.raises(DeviceMapError, match=r"places target.layers.3, which another key places"):
        load_device_map(twice)
