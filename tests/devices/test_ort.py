"""OrtDevice and OrtRunner: providers, placement, and a cached draft that equals torch's.

The runner's KV cache is written in place by ORT through IOBinding; every test compares its
logits with `TorchRunner` on the same tiny model step by step (prefill, decode, rollback, tree
rows, keep). OpenVINO and QNN tests run only where those providers are installed.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mirror_sd.devices import ort_core, ort_device, ort_kv, ort_placement
from mirror_sd.devices.base import ModelRunner
from mirror_sd.devices.ort_core import OrtDevice, ProviderUnavailableError
from mirror_sd.devices.ort_device import OrtRunner
from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.graphs import load_model
from mirror_sd.graphs.export import export_cached
from mirror_sd.graphs.kv_cache import CacheFullError
from mirror_sd.graphs.masks import causal_mask, tree_mask
from mirror_sd.runtime.autoregressive import positions
from tests.conftest import make_tiny, save_tiny

AVAILABLE = ort.get_available_providers()
CPU = OrtDevice(intra_op_threads=1)
TOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def draft(request, tmp_path_factory):
    """(model, whole-model ONNX path) per family, through the session-wide export cache."""
    folder = save_tiny(make_tiny(request.param), tmp_path_factory.mktemp(request.param))
    model = load_model(folder)
    cache = tmp_path_factory.getbasetemp() / "onnx-cache"
    return model, export_cached(model, cache, {"tiny": request.param, "seed": 0})


@pytest.fixture(scope="module")
def two_layer_graph(tmp_path_factory):
    """A 2-layer Qwen2's whole-model ONNX: its K/V cache differs from every `draft`'s (shared:
    one export serves the three families' fill tests)."""
    other = save_tiny(make_tiny("qwen2", num_hidden_layers=2), tmp_path_factory.mktemp("other"))
    cache = tmp_path_factory.getbasetemp() / "onnx-cache"
    return export_cached(load_model(other), cache, {"tiny": "other"})


class Pair:
    """An OrtRunner and a TorchRunner fed the same steps; `step` checks they agree."""

    def __init__(self, model, ort_runner):
        self.ort, self.torch = ort_runner, TorchRunner(model, TorchDevice(), ort_runner.max_len)

    def step(self, ids, pos=None, mask=None, tol=TOL):
        n, t = self.ort.length, len(ids)
        pos = positions(n, t) if pos is None else pos
        mask = causal_mask(n, t) if mask is None else mask
        a = self.ort.forward(torch.tensor([ids]), pos, mask)
        b = self.torch.forward(torch.tensor([ids]), pos, mask)
        assert a.dtype == torch.float32 and a.shape == (t, self.ort.vocab_size)
        assert (a - b).abs().max().item() <= tol
        assert self.ort.length == self.torch.length == n + t
        return a

    def apply(self, method, *args):
        getattr(self.ort, method)(*args)
        getattr(self.torch, method)(*args)


@pytest.mark.parametrize("kv_on_device", [False, True], ids=["host-kv", "ortvalue-kv"])
def test_runner_equals_torch_through_a_speculative_round(draft, kv_on_device):
    model, path = draft
    pair = Pair(model, OrtRunner(path, CPU, 32, kv_on_device=kv_on_device))
    pair.step([3, 1, 4, 1, 5, 9])  # S = 0 prefill
    pair.step([2])
    pair.step([6])
    pair.apply("rollback", 6)  # the two decoded rows were rejected
    pair.step([7, 8])
    n = pair.ort.length  # branches (11, 12), (21, 22) and (31,) as tree rows
    depth = torch.tensor([[0, 1, 0, 1, 0]])
    pair.step([11, 12, 21, 22, 31], n + depth, tree_mask(n, [-1, 0, -1, 2, -1]))
    pair.apply("keep", n, [n + 2, n + 3])  # branch (21, 22) wins
    pair.step([5])
    pair.apply("keep", n, [n, n + 1])  # keep the contiguous prefix: a length change only
    pair.step([4, 4, 4])


def test_fill_scores_one_row_and_leaves_the_cache_forward_would(draft, monkeypatch):
    model, path = draft
    filled, forwarded = OrtRunner(path, CPU, 32), OrtRunner(path, CPU, 32)
    fed = []
    bind = ort.IOBinding.bind_cpu_input

    def recording(self, name, value):
        if name == "logits_rows":
            fed.append(value.tolist())
        return bind(self, name, value)

    monkeypatch.setattr(ort.IOBinding, "bind_cpu_input", recording)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    assert filled.picks_rows  # the export has the input
    filled.fill(ids, positions(0, 6), causal_mask(0, 6))
    forwarded.forward(ids, positions(0, 6), causal_mask(0, 6))
    assert fed == [[5], [0, 1, 2, 3, 4, 5]]  # the fill asked for the last row only
    assert filled.length == forwarded.length == 6
    a = filled.forward(torch.tensor([[2]]), positions(6, 1), causal_mask(6, 1))
    b = forwarded.forward(torch.tensor([[2]]), positions(6, 1), causal_mask(6, 1))
    assert torch.equal(a, b)  # the same K/V rows were written


def test_a_long_fill_runs_on_the_fill_graph_and_a_short_one_on_the_own(draft, monkeypatch,
                                                                       two_layer_graph):  # fmt: skip
    model, path = draft
    # the int8 fill graph from the shared cache: quantized from `draft`'s fp32 export (no
    # second export), and the one test_int8_draft_runs_and_mostly_agrees_with_fp32 reuses
    int8 = export_cached(model, path.parent.parent, {"tiny": model.config.model_type, "seed": 0},
                         quantize="int8")  # fmt: skip
    runner = OrtRunner(path, CPU, 64, fill_graph=int8)
    ran = []
    run = ort.InferenceSession.run_with_iobinding

    def recording(self, *a, **k):
        ran.append(self)
        return run(self, *a, **k)

    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", recording)
    n = ort_device.FILL_GRAPH_ROWS
    runner.fill(torch.arange(n)[None], positions(0, n), causal_mask(0, n))
    runner.fill(torch.tensor([[1, 2]]), positions(n, 2), causal_mask(n, 2))  # a round's catch-up
    runner.forward(torch.tensor([[3]]), positions(n + 2, 1), causal_mask(n + 2, 1))
    assert ran == [runner.fill_sessions.session, runner.session, runner.session]
    assert runner.length == n + 3
    with pytest.raises(ValueError, match="K/V cache differs"):
        OrtRunner(path, CPU, 64, fill_graph=two_layer_graph)


def test_runner_is_a_model_runner_with_a_placement(draft):
    _, path = draft
    runner = OrtRunner(path, CPU, 16, alias="npu")
    assert isinstance(runner, ModelRunner)
    assert runner.name == "draft on npu (onnxruntime CPUExecutionProvider, 1 thread(s))"
    assert runner.vocab_size == 97 and runner.max_len == 16 and runner.length == 0
    assert runner.placement.startswith("CPUExecutionProvider: ")


def test_runner_errors_name_the_problem(draft):
    _, path = draft
    runner = OrtRunner(path, CPU, 4)
    with pytest.raises(ValueError, match=r"mask shape \(1, 2, 3\): expected \(1, 2, 2\)"):
        runner.forward(torch.tensor([[1, 2]]), positions(0, 2), causal_mask(1, 2))
    with pytest.raises(CacheFullError, match="raise max_len"):
        runner.forward(torch.tensor([[1, 2, 3, 4, 5]]), positions(0, 5), causal_mask(0, 5))
    runner.forward(torch.tensor([[1, 2, 3]]), positions(0, 3), causal_mask(0, 3))
    with pytest.raises(ValueError, match="outside"):
        runner.rollback(4)
    with pytest.raises(ValueError, match="increasing"):
        runner.keep(1, [2, 1])


def test_another_graph_is_not_a_runner(tmp_path):
    path = tmp_path / "copy.onnx"
    path.write_bytes(ort_kv._identity_model(np.float32, (2, 16)))
    with pytest.raises(ValueError, match="not a whole exported model"):
        OrtRunner(path, CPU, 8)


def test_int8_draft_runs_and_mostly_agrees_with_fp32(draft):
    model, path = draft
    q = export_cached(model, path.parent.parent, {"tiny": model.config.model_type, "seed": 0},
                      quantize="int8")  # fmt: skip
    fp32, int8 = OrtRunner(path, CPU, 64), OrtRunner(q, CPU, 64)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    a = fp32.forward(ids, positions(0, 40), causal_mask(0, 40))
    b = int8.forward(ids, positions(0, 40), causal_mask(0, 40))
    agreement = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert 0.0 <= agreement <= 1.0  # random weights: its value says little, its range a lot
    assert torch.isfinite(b).all()


# --- OrtDevice -------------------------------------------------------------------------------
def test_unknown_provider_lists_the_standard_names():
    with pytest.raises(ValueError, match="unknown execution provider 'NpuProvider'.*OpenVINO"):
        OrtDevice((("NpuProvider", {}),))


def test_bad_optimization_level_lists_the_levels():
    with pytest.raises(ValueError, match="disable, basic, extended, all"):
        OrtDevice(optimization_level="max")


@pytest.mark.skipif("CUDAExecutionProvider" in AVAILABLE, reason="CUDA EP is available here")
def test_unavailable_provider_lists_the_available_ones():
    device = OrtDevice((("CUDAExecutionProvider", {"device_id": 0}), ("CPUExecutionProvider", {})))
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider.*available: .*CPU"):
        device.check()


@pytest.mark.skipif("CUDAExecutionProvider" in AVAILABLE, reason="CUDA EP is available here")
def test_allow_fallback_drops_the_missing_provider_with_a_warning(draft):
    _, path = draft
    device = OrtDevice(
        (("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {})), allow_fallback=True
    )
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider is not available"):
        assert device.check() == (("CPUExecutionProvider", {}),)
    with pytest.warns(RuntimeWarning, match="not available"):
        runner = OrtRunner(path, device, 8)
    assert runner.session.get_providers() == ["CPUExecutionProvider"]


def test_describe_lists_providers_with_options():
    device = OrtDevice(
        (("OpenVINOExecutionProvider", {"device_type": "NPU"}), ("CPUExecutionProvider", {})),
        intra_op_threads=2,
    )
    assert device.describe() == (
        "onnxruntime OpenVINOExecutionProvider{device_type=NPU} > CPUExecutionProvider, 2 thread(s)"
    )


def test_actual_providers_from_the_assignment_record(draft):
    _, path = draft
    counts = ort_placement.actual_providers(CPU.session(path))
    assert set(counts) == {"CPUExecutionProvider"} and counts["CPUExecutionProvider"] > 50


def test_actual_providers_from_a_profile_on_older_onnxruntime(draft, monkeypatch):
    model, path = draft
    for module in (ort_core, ort_placement, ort_device):
        monkeypatch.setattr(module, "records_assignment_api", lambda: False)
    runner = OrtRunner(path, CPU, 8)  # profiles its first (warm-up) run
    assert runner.length == 0
    assert runner.placement.startswith("CPUExecutionProvider: ")
    Pair(model, runner).step([1, 2, 3])  # the warm-up left no trace in the cache


def test_actual_providers_needs_a_recording_session(draft):
    _, path = draft
    with pytest.raises(RuntimeError, match="record_placement=True"):
        ort_placement.actual_providers(CPU.session(path, record_placement=False))


def test_silent_fallback_is_reported_with_the_op_types():
    placement = {"OpenVINOExecutionProvider": {"MatMul": 290}, "CPUExecutionProvider": {"IsNaN": 4}}
    with pytest.warns(RuntimeWarning, match="4 of 294 nodes do not run on OpenVINO"):
        summary = ort_placement.placement_summary(placement, "OpenVINOExecutionProvider", "draft")
    assert (
        summary == "OpenVINOExecutionProvider: 290 nodes, CPUExecutionProvider: 4 nodes (IsNaN x4)"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ort_placement.placement_summary(
            {"CPUExecutionProvider": {"Add": 9}}, "CPUExecutionProvider"
        )


def test_the_exported_graph_has_no_ops_known_to_fall_back(draft):
    """IsNaN (from a bool SDPA mask) runs on the CPU EP under OpenVINO, splitting the graph.

    Each of the 4 layers' attention is an `If` (row-invariant small blocks / one GEMM for
    large ones, graphs/model.py `attend`) with one Softmax per branch.
    """
    _, path = draft
    ops = ort_placement.node_placement(CPU.session(path))["CPUExecutionProvider"]
    assert "IsNaN" not in ops and ops["Softmax"] == 4 * 2


# --- real accelerator providers: only where their onnxruntime build is installed -----------
@pytest.mark.skipif(
    "OpenVINOExecutionProvider" not in AVAILABLE,
    reason="needs onnxruntime-openvino: run `make test-ep` (it builds .venv-openvino)",
)
def test_openvino_cpu_equals_torch(draft):
    model, path = draft
    device = OrtDevice(
        (("OpenVINOExecutionProvider", {"device_type": "CPU", "precision": "FP32"}),)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no node may fall back to the CPU EP
        runner = OrtRunner(path, device, 32, alias="npu")
    assert "OpenVINOExecutionProvider" in runner.placement
    pair = Pair(model, runner)
    pair.step([3, 1, 4, 1, 5, 9], tol=1e-3)
    pair.step([2], tol=1e-3)
    n = runner.length
    pair.step([11, 12, 21], n + torch.tensor([[0, 1, 0]]), tree_mask(n, [-1, 0, -1]), tol=1e-3)
    pair.apply("keep", n, [n + 2])
    pair.step([5], tol=1e-3)


@pytest.mark.skipif(
    "QNNExecutionProvider" not in AVAILABLE,
    reason="needs onnxruntime-qnn with the HTP backend (simulator on x86): "
    "`make test-ep EP_PACKAGE=onnxruntime-qnn EP_VENV=.venv-qnn "
    "EP_PROVIDER=QNNExecutionProvider EP_TESTS=qnn`",
)
def test_qnn_htp_runs_the_draft_in_fp16(draft):
    model, path = draft
    options = {"backend_path": "libQnnHtp.so", "enable_htp_fp16_precision": "1"}
    runner = OrtRunner(path, OrtDevice((("QNNExecutionProvider", options),)), 32)
    ids = [3, 1, 4, 1, 5, 9]
    logits = runner.forward(torch.tensor([ids]), positions(0, 6), causal_mask(0, 6))
    ref = TorchRunner(model, TorchDevice(), 32).forward(
        torch.tensor([ids]), positions(0, 6), causal_mask(0, 6)
    )
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.8  # fp16 HTP
