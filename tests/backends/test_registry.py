"""The backend registry: one backend per spec type, the capabilities the partitioner asks
(as the isinstance chains they replace answered them), and no such chain left elsewhere."""

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import mirror_sd
from mirror_sd.backends.facts import (
    FACTS,
    HOST_CPU,
    capabilities,
)
from mirror_sd.backends.ort import OrtBackend
from mirror_sd.backends.pytorch import TorchBackend
from mirror_sd.backends.registry import BACKENDS, backend_for
from mirror_sd.backends.sim import SimBackend
from mirror_sd.partition.device_map import (
    ORT_PROVIDERS,
    SPEC_CLASSES,
    DeviceMap,
    DeviceSpec,
    OrtSpec,
    SimSpec,
    TorchSpec,
)
from mirror_sd.partition.precision import (
    CpuCaps,
    choose_dtype,
    choose_quantize,
    choose_torch_quantize,
)

PACKAGE = Path(mirror_sd.__file__).parent
DOCS = PACKAGE.parent / "docs" / "architecture.md"
AMX = CpuCaps("mock", frozenset({"avx2", "amx_int8", "amx_bf16"}))


def ort(alias="o", name="CPUExecutionProvider", options=None, **kw):
    return OrtSpec(alias, ((name, options or {}),), **kw)


def openvino(device_type):
    return ort(name="OpenVINOExecutionProvider", options={"device_type": device_type})


def test_every_spec_type_of_the_schema_has_exactly_one_backend():
    assert set(BACKENDS) == set(FACTS) == set(SPEC_CLASSES.values())
    for backend_name, spec_type in SPEC_CLASSES.items():
        owners = [b for t, b in BACKENDS.items() if issubclass(spec_type, t)]
        assert len(owners) == 1
        assert owners[0].spec_type is spec_type and owners[0].name == backend_name
        assert isinstance(owners[0], type(FACTS[spec_type]))  # its facts are the partitioner's
    assert type(backend_for(ort())) is OrtBackend
    assert type(backend_for(TorchSpec("t"))) is TorchBackend
    assert type(backend_for(SimSpec("s", "p.json"))) is SimBackend


def test_an_unknown_spec_type_is_a_clear_error_and_a_subclass_is_its_parents():
    @dataclass(frozen=True)
    class NpuSpec(DeviceSpec):
        backend = "npu"

    with pytest.raises(TypeError, match=r"no backend runs NpuSpec .*registered: .*OrtSpec"):
        backend_for(NpuSpec("n"))
    with pytest.raises(TypeError, match=r"no backend runs NpuSpec .*registered: .*SimSpec"):
        capabilities(NpuSpec("n"))  # the partitioner's lookup says the same
    with pytest.raises(TypeError, match="no backend runs str"):
        backend_for("cpu")

    @dataclass(frozen=True)
    class MyOrtSpec(OrtSpec):
        pass

    assert type(backend_for(MyOrtSpec("o"))) is OrtBackend


@pytest.mark.parametrize(
    ("spec", "physical", "memory", "threads", "solo"),
    [
        (ort(), HOST_CPU, "cpu", None, 4),  # the CPU provider: host cores, the budget's
        (ort(intra_op_threads=2), HOST_CPU, "cpu", 2, 2),  # pinned by the map
        (ort(name="OpenVINOExecutionProvider"), HOST_CPU, "cpu", None, 4),  # device_type CPU
        (openvino("CPU_FP32"), HOST_CPU, "cpu", None, 4),
        (openvino("NPU"), "openvino:npu", "cpu", None, None),  # host memory, its own cores
        (ort(name="CUDAExecutionProvider", options={"device_id": 1}), "cuda:1", "cuda", None, None),
        (ort(name="TensorrtExecutionProvider"), "cuda:0", "cuda", None, None),
        (ort("npu", "QNNExecutionProvider"), "npu", "cpu", None, None),
        (ort("dml", "DmlExecutionProvider"), "dml", "dml", None, None),
        (ort(physical="socket1"), "socket1", "cpu", None, None),
        (TorchSpec("t", "cpu"), HOST_CPU, "cpu", None, 4),
        (TorchSpec("t", "cpu", threads=3), HOST_CPU, "cpu", 3, 3),
        (TorchSpec("t", "cuda:1"), "cuda:1", "cuda", None, None),
        (TorchSpec("t", "cuda"), "cuda", "cuda", None, None),
        (TorchSpec("t", "mps"), "mps", "mps", None, None),
        (SimSpec("s", "p.json"), "s", "cpu", None, None),  # its own (simulated) hardware
    ],
)
def test_capabilities_are_what_the_partitioner_was_told(spec, physical, memory, threads, solo):
    caps = capabilities(spec)
    assert backend_for(spec).capabilities(spec) == caps
    assert (caps.physical, caps.memory, caps.threads) == (physical, memory, threads)
    assert caps.on_host_cpu == (physical == HOST_CPU)
    assert caps.solo_threads(cores=4) == solo
    assert caps.whole_models == isinstance(spec, OrtSpec)  # schema v1: ORT runs whole models


def test_an_ort_device_knows_when_it_computes_on_the_host_cores():
    """OrtDevice applies the provider facts: the CPU provider and OpenVINO's CPU device share
    the host's cores (the thread budget counts them); OpenVINO's NPU and CUDA do not."""
    from mirror_sd.devices.ort_core import OrtDevice

    cases = [(("CPUExecutionProvider", {}), True),
             (("OpenVINOExecutionProvider", {}), True),
             (("OpenVINOExecutionProvider", {"device_type": "CPU"}), True),
             (("OpenVINOExecutionProvider", {"device_type": "NPU"}), False),
             (("CUDAExecutionProvider", {"device_id": 0}), False)]  # fmt: skip
    for provider, on_cpu in cases:
        assert OrtDevice((provider,)).on_host_cpu == on_cpu, provider


def test_precision_auto_is_resolved_by_each_family():
    q4 = ort(quantize="auto")
    spec, note = backend_for(q4).resolve_precision(q4, "int4", AMX)
    assert spec.quantize == choose_quantize("int4", AMX).value == "int4"
    assert note == choose_quantize("int4", AMX).describe()
    assert backend_for(ort()).resolve_precision(ort(), "int4", AMX) == (ort(), None)

    cpu = TorchSpec("t", "cpu", dtype="auto", quantize="auto")
    spec, note = backend_for(cpu).resolve_precision(cpu, "bfloat16", AMX)
    assert spec.quantize == choose_torch_quantize("bfloat16", "cpu", AMX).value
    assert note.count("auto ->") == 2
    gpu = TorchSpec("g", "cuda", dtype="auto")  # the host CPU's flags do not apply to a GPU
    spec, note = backend_for(gpu).resolve_precision(gpu, "bfloat16", AMX)
    assert spec.dtype == choose_dtype("bfloat16", "cuda", None).value
    assert note == choose_dtype("bfloat16", "cuda", None).describe()

    sim = SimSpec("s", "p.json")
    assert backend_for(sim).resolve_precision(sim, "int4", AMX) == (sim, None)


def test_torch_models_and_pre_export_work_by_family(tmp_path):
    sim = SimSpec("s", "p.json")
    host = backend_for(sim).torch_spec(sim)
    assert (host.alias, host.device, host.dtype) == ("s", "cpu", "float32")
    assert backend_for(TorchSpec("t")).torch_spec(TorchSpec("t")) == TorchSpec("t")
    assert backend_for(ort()).torch_spec(ort()) is None
    for spec in (TorchSpec("t"), sim):
        backend_for(spec).check(spec, None, "draft")  # nothing to check before an export
        assert backend_for(spec).draft_export(spec, tmp_path, tmp_path) is None
    dm = DeviceMap({"s": sim}, {"target": "s"}, source=str(tmp_path / "map.yaml"))
    assert backend_for(sim).with_absolute_paths(sim, dm).profile == str(tmp_path / "p.json")
    assert backend_for(ort()).with_absolute_paths(ort(), dm) == ort()


def test_a_missing_execution_provider_fails_the_pre_export_check():
    import onnxruntime

    from mirror_sd.devices.ort_core import ProviderUnavailableError

    missing = [p for p in ORT_PROVIDERS if p not in onnxruntime.get_available_providers()]
    if not missing:
        pytest.skip("this onnxruntime has every provider")
    spec = ort(name=missing[0])
    with pytest.raises(ProviderUnavailableError, match=missing[0]):
        backend_for(spec).check(spec, None, "target")


def test_the_partitioner_and_the_facts_import_no_onnxruntime():
    code = (
        "import sys, mirror_sd.backends.facts, mirror_sd.partition, mirror_sd.partition.threads; "
        "print('onnxruntime' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_isinstance_on_spec_types_outside_the_backends():
    names = "|".join(sorted({"DeviceSpec", *(c.__name__ for c in SPEC_CLASSES.values())}))
    chain = re.compile(rf"\b(isinstance|issubclass)\([^)]*\b({names})\b")
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{n}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if PACKAGE / "backends" not in path.parents
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if chain.search(line)
    ]
    assert found == [], "dispatch on a spec type belongs to mirror_sd.backends.backend_for"


def test_every_backend_has_its_docs_row():
    section = DOCS.read_text(encoding="utf-8").split("## Backends", 1)[1].split("\n## ", 1)[0]
    for backend in BACKENDS.values():
        module = type(backend).__module__.rsplit(".", 1)[1]
        assert f"`backends/{module}.py`" in section and f"`{backend.name}`" in section
        assert type(FACTS[backend.spec_type]).__name__ in section
