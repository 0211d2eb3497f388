"""The thread budget: physical devices from map entries, counts per pipeline and phase."""

import pytest

from mirror_sd.partition.device_map import OrtSpec, SimSpec, TorchSpec
from mirror_sd.partition.threads import ThreadBudget, physical_device

CPU_EP = (("CPUExecutionProvider", {}),)


def ort(alias, providers=CPU_EP, **kw):
    return OrtSpec(alias, providers, **kw)


@pytest.mark.parametrize(
    ("spec", "physical"),
    [
        (TorchSpec("t", "cpu"), "cpu"),
        (TorchSpec("t", "cuda:1"), "cuda:1"),
        (ort("o"), "cpu"),
        (ort("o", (("OpenVINOExecutionProvider", {"device_type": "CPU"}),)), "cpu"),
        (ort("o", (("OpenVINOExecutionProvider", {"device_type": "NPU"}),)), "openvino:npu"),
        (ort("o", (("CUDAExecutionProvider", {"device_id": 2}),)), "cuda:2"),
        (ort("npu", (("QNNExecutionProvider", {}),)), "npu"),
        (ort("o", physical="socket1"), "socket1"),
        (SimSpec("s", "p.json"), "s"),
    ],
)
def test_physical_device_is_derived_or_given(spec, physical):
    assert physical_device(spec) == physical


def test_a_shared_cpu_gives_every_core_to_a_pipeline_that_runs_alone():
    b = ThreadBudget.for_devices(ort("tgt"), ort("drf"), cores=4)
    assert b.shared
    assert (b.target(), b.draft()) == (4, 4)
    assert (b.target(overlapped=True), b.draft(overlapped=True)) == (4, 4)  # share: OS decides
    assert "share cpu (4 cores)" in b.describe()


def test_split_overlap_partitions_the_cores_only_while_overlapped():
    b = ThreadBudget.for_devices(ort("tgt"), ort("drf"), "split", target_cores=3, cores=4)
    assert (b.target(), b.draft()) == (4, 4)
    assert (b.target(overlapped=True), b.draft(overlapped=True)) == (3, 1)
    half = ThreadBudget.for_devices(ort("tgt"), ort("drf"), "split", cores=2)
    assert (half.target(overlapped=True), half.draft(overlapped=True)) == (1, 1)


def test_separate_devices_never_split_and_accelerators_keep_their_defaults():
    b = ThreadBudget.for_devices(
        TorchSpec("gpu", "cuda:0"), ort("npu", (("QNNExecutionProvider", {}),)), "split", cores=8
    )
    assert not b.shared
    assert (b.target(), b.draft(), b.target(True), b.draft(True)) == (None, None, None, None)
    gpu_cpu = ThreadBudget.for_devices(TorchSpec("gpu", "cuda:0"), ort("cpu"), "split", cores=8)
    assert (gpu_cpu.draft(), gpu_cpu.draft(True)) == (8, 8)  # the CPU draft has the CPU alone


def test_threads_pinned_by_the_map_are_honoured():
    b = ThreadBudget.for_devices(ort("tgt", intra_op_threads=1), ort("drf"), "split", cores=2)
    assert (b.target(), b.target(True)) == (1, 1)
    assert b.draft() == 2


def test_target_alone_and_bad_splits():
    assert ThreadBudget.for_devices(ort("tgt"), None, cores=2).target() == 2
    with pytest.raises(ValueError, match="target_cores in \\[1, 1\\]"):
        ThreadBudget.for_devices(ort("tgt"), ort("drf"), "split", target_cores=2, cores=2)
    with pytest.raises(ValueError, match="overlap 'half'"):
        ThreadBudget.for_devices(ort("tgt"), ort("drf"), "half", cores=2)
