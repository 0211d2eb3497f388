"""OrtDevice: ONNX Runtime sessions on ordered execution providers; OrtRunner: a draft on one.

`OrtDevice` is the device map's `backend: onnxruntime` entry made executable: it checks the
providers against this machine (`check`), builds sessions, and tells which provider really
ran each node (`actual_providers`) — ORT silently runs nodes an accelerator's provider
rejects on the CPU provider, and a draft that is "on the NPU" but half on the CPU is the
most common surprise of heterogeneous decoding.

`OrtRunner` is the `ModelRunner` for an exported whole model (`graphs.export`, embed..head).
Its KV cache is preallocated per layer as (1, max_len, nkv, hd); every forward binds
`past_*_i` as a pointer to rows [0, length) and `new_*_i` as a pointer to rows
[length, length + T) of the same buffer (IOBinding), so ORT reads and writes the cache in
place: only ids, positions and the mask go in and only the logits come out.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mirror_sd.graphs.kv_cache import CacheFullError
from mirror_sd.partition.device_map import ORT_PROVIDERS

STANDARD_PROVIDERS = ORT_PROVIDERS  # the execution providers a device map may name
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# Providers whose inputs and outputs live in device memory, and that memory's OrtValue name.
# The others (CPU, OpenVINO, QNN, CoreML) take host memory and copy to the device themselves.
DEVICE_MEMORY = {
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
}
_RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"  # recent ORT (1.24, 1.32 have it)
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class ProviderUnavailableError(RuntimeError):
    """A requested execution provider is not in this onnxruntime build."""


@dataclass(frozen=True)
class OrtDevice:
    """ONNX Runtime session settings: providers in priority order, as ORT takes them.

    `providers` is ((name, options), ...), e.g. (("OpenVINOExecutionProvider",
    {"device_type": "NPU"}), ("CPUExecutionProvider", {})). With `allow_fallback` a provider
    missing from this onnxruntime build is dropped with a warning instead of an error.
    """

    providers: tuple[tuple[str, dict[str, Any]], ...] = (("CPUExecutionProvider", {}),)
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    optimization_level: str = "all"  # disable | basic | extended | all
    allow_fallback: bool = False

    def __post_init__(self) -> None:
        providers = tuple((str(n), dict(o or {})) for n, o in self.providers)
        object.__setattr__(self, "providers", providers)
        if not providers:
            raise ValueError("OrtDevice needs at least one execution provider")
        for name, _ in providers:
            if name not in STANDARD_PROVIDERS:
                raise ValueError(
                    f"unknown execution provider {name!r}; standard names: "
                    f"{', '.join(STANDARD_PROVIDERS)}"
                )
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            raise ValueError(
                f"optimization_level {self.optimization_level!r}: expected one of "
                f"{', '.join(OPTIMIZATION_LEVELS)}"
            )

    def check(self) -> tuple[tuple[str, dict[str, Any]], ...]:
        """The providers a session will get, in order, after checking this onnxruntime build.

        Raises:
            ProviderUnavailableError: a provider is not available and `allow_fallback` is off.
        """
        available = ort.get_available_providers()
        kept = tuple((n, o) for n, o in self.providers if n in available)
        missing = [n for n, _ in self.providers if n not in available]
        if missing and not self.allow_fallback:
            raise ProviderUnavailableError(
                f"execution provider {missing[0]} is not available in this onnxruntime "
                f"({ort.__version__}, package {ort.get_device()}); available: "
                f"{', '.join(available)}. Install the onnxruntime build that has it "
                "(onnxruntime-gpu, onnxruntime-openvino, onnxruntime-qnn, onnxruntime-directml) "
                "or set allow_fallback: true to run on the next listed provider"
            )
        for name in missing:
            warnings.warn(
                f"execution provider {name} is not available (available: "
                f"{', '.join(available)}); falling back to the next listed provider",
                RuntimeWarning,
                stacklevel=2,
            )
        return kept or (("CPUExecutionProvider", {}),)

    def describe(self) -> str:
        """e.g. 'onnxruntime OpenVINOExecutionProvider{device_type=NPU} > CPUExecutionProvider'."""
        names = [name + _braced(options) for name, options in self.providers]
        threads = f", {self.intra_op_threads} thread(s)" if self.intra_op_threads else ""
        return f"onnxruntime {' > '.join(names)}{threads}"

    def session_options(self, record_placement: bool = True) -> ort.SessionOptions:
        """Session options for these settings; `record_placement` prepares `actual_providers`."""
        so = ort.SessionOptions()
        so.graph_optimization_level = OPTIMIZATION_LEVELS[self.optimization_level]
        if self.intra_op_threads is not None:
            so.intra_op_num_threads = self.intra_op_threads
        if self.inter_op_threads is not None:
            so.inter_op_num_threads = self.inter_op_threads
        so.log_severity_level = 3  # errors only: ORT's placement notes come via actual_providers
        if record_placement and _records_assignment_api():
            so.add_session_config_entry(_RECORD_ASSIGNMENT, "1")
        elif record_placement:  # older ORT: learn the placement from a profile of the first run
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "mirror_sd_ort_profile")
        return so

    def session(self, path: str | Path, record_placement: bool = True) -> ort.InferenceSession:
        """An InferenceSession for the model at `path` on the checked providers."""
        providers = self.check()
        return ort.InferenceSession(
            str(path),
            self.session_options(record_placement),
            providers=[n for n, _ in providers],
            provider_options=[{k: str(v) for k, v in o.items()} for _, o in providers],
        )


def session_memory(session: ort.InferenceSession) -> tuple[str, int]:
    """(OrtValue device type, device id) where the session's first provider wants tensors."""
    name = session.get_providers()[0]
    options = session.get_provider_options().get(name, {})
    return DEVICE_MEMORY.get(name, "cpu"), int(options.get("device_id", 0))


def _braced(options: dict[str, Any]) -> str:
    """{'device_type': 'NPU'} -> '{device_type=NPU}'; {} -> ''."""
    return "{" + ", ".join(f"{k}={v}" for k, v in options.items()) + "}" if options else ""


def _records_assignment_api() -> bool:
    return hasattr(ort.InferenceSession, "get_provider_graph_assignment_info")


def node_placement(session: ort.InferenceSession) -> dict[str, dict[str, int]]:
    """Execution provider -> {op type: number of nodes} that it runs in `session`.

    Read from ORT's graph assignment record (sessions from `OrtDevice.session`, recent ORT),
    else from the profile of the session's first run (older ORT; call after one run). A fused
    accelerator subgraph counts all the nodes it swallowed.

    Raises:
        RuntimeError: the session records neither (it was not made by `OrtDevice.session`).
    """
    options = session.get_session_options()
    placement: dict[str, Counter[str]] = {}
    if _records_assignment_api() and _config(options, _RECORD_ASSIGNMENT) == "1":
        for subgraph in session.get_provider_graph_assignment_info():
            ops = placement.setdefault(subgraph.ep_name, Counter())
            ops.update(node.op_type for node in subgraph.get_nodes())
        return {ep: dict(ops) for ep, ops in placement.items()}
    profile = session.end_profiling() if options.enable_profiling else ""
    if not profile:
        raise RuntimeError(
            "this session records no node placement; create it with "
            "OrtDevice.session(path, record_placement=True) (and, on an ORT without "
            "assignment records, run it once first)"
        )
    return _placement_from_profile(Path(profile))


def actual_providers(session: ort.InferenceSession) -> dict[str, int]:
    """Execution provider -> number of graph nodes it runs in `session` (see node_placement)."""
    return {ep: sum(ops.values()) for ep, ops in node_placement(session).items()}


def _config(options: ort.SessionOptions, key: str) -> str | None:
    try:
        return options.get_session_config_entry(key)
    except RuntimeError:  # ORT raises for a key that was never set
        return None


def _placement_from_profile(path: Path) -> dict[str, dict[str, int]]:
    """Op types per provider of the nodes in an ORT profile (Chrome trace JSON); deletes it."""
    events = json.loads(path.read_text())
    path.unlink(missing_ok=True)
    placement: dict[str, Counter[str]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            args = e.get("args", {})
            placement.setdefault(args.get("provider", "?"), Counter())[
                args.get("op_name", "?")
            ] += 1
    return {ep: dict(ops) for ep, ops in placement.items()}


def placement_summary(
    placement: dict[str, dict[str, int]], expected: str, who: str = "stage"
) -> str:
    """'OpenVINOExecutionProvider: 299 nodes, CPUExecutionProvider: 4 nodes (IsNaN x4)'; warns
    when any node runs on a provider other than `expected` (the first requested one)."""
    counts = {ep: sum(ops.values()) for ep, ops in placement.items()}
    parts = []
    for ep, n in sorted(counts.items(), key=lambda x: -x[1]):
        ops = ", ".join(f"{op} x{k}" for op, k in sorted(placement[ep].items()))
        parts.append(f"{ep}: {n} nodes" + (f" ({ops})" if ep != expected else ""))
    summary = ", ".join(parts)
    elsewhere = sum(n for ep, n in counts.items() if ep != expected)
    if elsewhere:
        warnings.warn(
            f"{who}: {elsewhere} of {sum(counts.values())} nodes do not run on {expected} "
            f"({summary}); those operators are not supported there and fall back",
            RuntimeWarning,
            stacklevel=2,
        )
    return summary


class _HostKV:
    """K/V buffers (L, 1, max_len, nkv, hd) in host memory (CPU, OpenVINO, QNN, CoreML)."""

    memory = ("cpu", 0)

    def __init__(self, layers: int, shape: tuple[int, int, int, int], dtype: np.dtype):
        self.k = np.zeros((layers, *shape), dtype)  # (L, 1, max_len, nkv, hd)
        self.v = np.zeros((layers, *shape), dtype)
        self.row_shape = shape[2:]
        self.row_bytes = int(np.prod(self.row_shape)) * self.k.itemsize

    def pointers(self, layer: int) -> tuple[tuple[str, int], ...]:
        """(kind, address of row 0) for this layer's K and V."""
        return (("k", self.k[layer].ctypes.data), ("v", self.v[layer].ctypes.data))

    def move_rows(self, src: list[int], start: int) -> None:
        dst = slice(start, start + len(src))
        self.k[:, :, dst] = self.k[:, :, src]
        self.v[:, :, dst] = self.v[:, :, src]


class _DeviceKV:
    """K/V buffers as OrtValues in device memory (CUDA, TensorRT, DirectML).

    Row moves run a one-node Identity graph per row with input and output bound to the two
    rows, i.e. a device-to-device copy. Only its CPU form is tested here (no GPU): force it
    with `OrtRunner(..., kv_on_device=True)`.
    """

    def __init__(self, layers: int, shape: tuple[int, int, int, int], dtype: np.dtype,
                 main: ort.InferenceSession):  # fmt: skip
        self.memory, self.dtype, self.row_shape = session_memory(main), dtype, shape[2:]
        self.row_bytes = int(np.prod(self.row_shape)) * np.dtype(dtype).itemsize
        new = ort.OrtValue.ortvalue_from_shape_and_type
        self.k = [new(shape, dtype, *self.memory) for _ in range(layers)]  # (1, max_len, nkv, hd)
        self.v = [new(shape, dtype, *self.memory) for _ in range(layers)]
        provider = main.get_providers()[0]  # the copy runs where the cache lives
        self._copy = ort.InferenceSession(
            _identity_model(dtype, self.row_shape),
            providers=[provider],
            provider_options=[main.get_provider_options().get(provider, {})],
        )

    def pointers(self, layer: int) -> tuple[tuple[str, int], ...]:
        return (("k", self.k[layer].data_ptr()), ("v", self.v[layer].data_ptr()))

    def move_rows(self, src: list[int], start: int) -> None:
        binding = self._copy.io_binding()
        shape = (1, 1, *self.row_shape)
        for buf in (*self.k, *self.v):
            base = buf.data_ptr()
            for i, row in enumerate(src):  # rows increase and row >= start + i: no overlap
                dst = base + (start + i) * self.row_bytes
                binding.bind_input(
                    "x", *self.memory, self.dtype, shape, base + row * self.row_bytes
                )
                binding.bind_output("y", *self.memory, self.dtype, shape, dst)
                self._copy.run_with_iobinding(binding)


def _identity_model(dtype: np.dtype, row_shape: tuple[int, ...]) -> bytes:
    """A serialized one-node graph y = Identity(x), x (1, n, *row_shape): a device copy."""
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    shape = [1, "n", *row_shape]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "row_copy",
        [onnx.helper.make_tensor_value_info("x", elem, shape)],
        [onnx.helper.make_tensor_value_info("y", elem, shape)],
    )
    opset = [onnx.helper.make_opsetid("", 18)]
    model = onnx.helper.make_model(graph, opset_imports=opset, ir_version=8)  # opset 18's IR
    return model.SerializeToString()


class RowCacheMixin:
    """Length-pointer semantics of a preallocated KV cache `self.kv` (as `StaticKVCache`)."""

    length: int
    max_len: int
    name: str
    kv: _HostKV | _DeviceKV

    def _check(self, t: int, mask: torch.Tensor) -> int:
        """T, after checking the cache has room for T rows and the mask's shape."""
        n = self.length
        if n + t > self.max_len:
            raise CacheFullError(
                f"{self.name}: KV cache holds {self.max_len} rows; writing {t} rows at {n} "
                "would overflow it: raise max_len (the context length) when loading the model"
            )
        if tuple(mask.shape) != (1, t, n + t):
            raise ValueError(f"mask shape {tuple(mask.shape)}: expected (1, {t}, {n + t})")
        return t

    def rollback(self, length: int) -> None:
        """Forget every row from `length` on, in every layer (O(1): moves the pointer)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"rollback to {length} outside [0, {self.length}]")
        self.length = length

    def keep(self, start: int, rows: Sequence[int]) -> None:
        """Keep rows[i] at position start + i in every layer (a winning branch);
        length = start + len(rows)."""
        rows = list(rows)
        if any(r < start or r >= self.length for r in rows) or rows != sorted(set(rows)):
            raise ValueError(f"rows {rows} must be increasing and within [{start}, {self.length})")
        if rows != list(range(start, start + len(rows))):
            self.kv.move_rows(rows, start)
        self.length = start + len(rows)


class OrtRunner(RowCacheMixin):
    """`ModelRunner` for an exported whole model (input_ids .. logits) on an `OrtDevice`.

    `kv_on_device` None keeps the cache where the first provider wants its tensors (device
    memory for CUDA / TensorRT / DirectML, host memory otherwise); True forces OrtValue buffers.
    `placement` says which providers run the graph's nodes (see `node_placement`).
    """

    def __init__(self, path: str | Path, device: OrtDevice, max_len: int, name: str = "draft",
                 alias: str | None = None, kv_on_device: bool | None = None):  # fmt: skip
        self.session = device.session(path)
        self.device, self.max_len, self.length = device, max_len, 0
        self.n_layers, kv_shape, self.dtype = _interface(self.session, path)
        self.vocab_size = int(self.session.get_outputs()[0].shape[2])
        if kv_on_device or (kv_on_device is None and session_memory(self.session)[0] != "cpu"):
            self.kv: _HostKV | _DeviceKV = _DeviceKV(
                self.n_layers, (1, max_len, *kv_shape), self.dtype, self.session
            )
        else:
            self.kv = _HostKV(self.n_layers, (1, max_len, *kv_shape), self.dtype)
        where = f"{alias} ({device.describe()})" if alias else device.describe()
        self.name = f"{name} on {where}"
        if not _records_assignment_api():  # the profile needs one run; it writes row 0 only
            self.forward(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                         torch.ones(1, 1, 1, dtype=torch.bool))  # fmt: skip
            self.length = 0
        placement = node_placement(self.session)
        self.placement = placement_summary(placement, self.session.get_providers()[0], self.name)

    def forward(
        self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """ids, position_ids (1, T) int64; mask (1, T, length + T) bool -> logits (T, V) fp32.

        Appends the T rows' K/V to the cache (length += T).
        """
        t, n = self._check(ids.shape[1], mask), self.length
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", _host(ids, np.int64))
        binding.bind_cpu_input("position_ids", _host(position_ids, np.int64))
        binding.bind_cpu_input("mask", _host(mask, np.bool_))
        past, new = (1, n, *self.kv.row_shape), (1, t, *self.kv.row_shape)
        mem = self.kv.memory  # (device type, id)
        for layer in range(self.n_layers):
            for kind, base in self.kv.pointers(layer):
                binding.bind_input(f"past_{kind}_{layer}", *mem, self.dtype, past, base)
                end = base + n * self.kv.row_bytes  # rows [n, n + t) of the same buffer
                binding.bind_output(f"new_{kind}_{layer}", *mem, self.dtype, new, end)
        logits = np.empty((1, t, self.vocab_size), self.dtype)  # (1, T, V)
        binding.bind_output("logits", "cpu", 0, self.dtype, logits.shape, logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        self.length = n + t
        return torch.from_numpy(logits[0]).float()  # (T, V)


def _host(t: torch.Tensor, dtype: type) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)


def _interface(session: ort.InferenceSession, path: str | Path) -> tuple[int, tuple, np.dtype]:
    """(layers, (nkv, hd), cache dtype) of an exported whole model; a clear error otherwise."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    n_layers = sum(1 for name in inputs if name.startswith("past_k_"))
    need = ["input_ids", "position_ids", "mask", "past_k_0"]
    if any(k not in inputs for k in need) or outputs[:1] != ["logits"]:
        raise ValueError(
            f"{path} is not a whole exported model (inputs {sorted(inputs)[:6]}..., outputs "
            f"{outputs[:3]}...); export it with export_stages(..., with_embed=True, "
            "with_head=True) over all layers"
        )
    past = inputs["past_k_0"]
    if past.type not in _NUMPY_DTYPES:
        raise ValueError(f"{path}: KV cache type {past.type} is not supported (float, float16)")
    return n_layers, (int(past.shape[2]), int(past.shape[3])), np.dtype(_NUMPY_DTYPES[past.type])
