"""The ONNX Runtime core of the devices layer: the one home for what every ORT runner needs.

    OrtDevice        the device map's `backend: onnxruntime` entry: providers (checked against
                     this onnxruntime build), session options, sessions
    SessionPool      one graph's sessions, one per intra-op thread count (the thread budget
                     switches between them); all of them share one copy of the weights
    HostKV/DeviceKV  preallocated K/V buffers, one (1, max_len, nkv, hd) per layer, in host or
                     device memory
    RowCache         length-pointer semantics over them (as graphs.kv_cache.StaticKVCache)
    bind_kv          binds a layer range's past_*/new_* to rows [0, n) / [n, n + T) in place
    node_placement   which execution provider really runs which node

ORT silently runs the nodes an accelerator's provider rejects on the CPU provider; a draft
that is "on the NPU" but half on the CPU is the most common surprise of heterogeneous
decoding, so every runner reports its placement (`placement_summary`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
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

from mirror_sd.graphs.export import cached_entry
from mirror_sd.graphs.kv_cache import CacheFullError
from mirror_sd.partition.device_map import ORT_PROVIDERS

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
NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"  # recent ORT (1.24, 1.32 have it)
SPINNING = "session.intra_op.allow_spinning"
SPIN_STOP = "session.force_spinning_stop"  # pool threads stop spinning when a run returns
SAVE_PREPACKED = "session.save_external_prepacked_constant_initializers"


class ProviderUnavailableError(RuntimeError):
    """A requested execution provider is not in this onnxruntime build."""


@dataclass(frozen=True)
class OrtDevice:
    """ONNX Runtime session settings: providers in priority order, as ORT takes them.

    `providers` is ((name, options), ...), e.g. (("OpenVINOExecutionProvider",
    {"device_type": "NPU"}), ("CPUExecutionProvider", {})). With `allow_fallback` a provider
    missing from this onnxruntime build is dropped with a warning instead of an error.
    `intra_op_threads` is the thread count of a session made without an explicit one (None:
    ORT's default, every core). `spinning` False makes idle pool threads sleep at once
    instead of spinning. `spin_stop` keeps spinning inside a run (threads wait for the
    next operator's work without sleeping) and stops it when the run returns, so a pool does
    not spin into the other pipeline's turn: what pipelines that take turns on the same cores
    want (measured on the 2-core EPYC, a speculative round of 4 int8 0.5B draft steps and a
    5-row fp32 1.5B verification: 266 ms, against 309 ms with spinning off and 364 ms with
    ORT's default spinning; docs/runtime.md, Threads).
    """

    providers: tuple[tuple[str, dict[str, Any]], ...] = (("CPUExecutionProvider", {}),)
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    optimization_level: str = "all"  # disable | basic | extended | all
    allow_fallback: bool = False
    spinning: bool = True
    spin_stop: bool = False

    def __post_init__(self) -> None:
        providers = tuple((str(n), dict(o or {})) for n, o in self.providers)
        object.__setattr__(self, "providers", providers)
        if not providers:
            raise ValueError("OrtDevice needs at least one execution provider")
        for name, _ in providers:
            if name not in ORT_PROVIDERS:
                raise ValueError(
                    f"unknown execution provider {name!r}; standard names: "
                    f"{', '.join(ORT_PROVIDERS)}"
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

    @property
    def on_host_cpu(self) -> bool:
        """True when the first provider computes on this machine's CPU cores."""
        name, options = self.providers[0]
        if name == "CPUExecutionProvider":
            return True
        return name == "OpenVINOExecutionProvider" and str(
            options.get("device_type", "CPU")
        ).upper().startswith("CPU")

    def describe(self) -> str:
        """e.g. 'onnxruntime OpenVINOExecutionProvider{device_type=NPU} > CPUExecutionProvider'."""
        names = [name + _braced(options) for name, options in self.providers]
        threads = f", {self.intra_op_threads} thread(s)" if self.intra_op_threads else ""
        return f"onnxruntime {' > '.join(names)}{threads}"

    def session_options(
        self, record_placement: bool = True, threads: int | None = None
    ) -> ort.SessionOptions:
        """Session options for these settings; `threads` overrides `intra_op_threads`;
        `record_placement` prepares `node_placement`."""
        so = ort.SessionOptions()
        so.graph_optimization_level = OPTIMIZATION_LEVELS[self.optimization_level]
        threads = threads if threads is not None else self.intra_op_threads
        if threads is not None:
            so.intra_op_num_threads = threads
        if self.inter_op_threads is not None:
            so.inter_op_num_threads = self.inter_op_threads
        if not self.spinning:
            so.add_session_config_entry(SPINNING, "0")
        elif self.spin_stop:
            so.add_session_config_entry(SPINNING, "1")
            so.add_session_config_entry(SPIN_STOP, "1")
        so.log_severity_level = 3  # errors only: ORT's placement notes come via node_placement
        if record_placement and records_assignment_api():
            so.add_session_config_entry(RECORD_ASSIGNMENT, "1")
        elif record_placement:  # older ORT: learn the placement from a profile of the first run
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "mirror_sd_ort_profile")
        return so

    def session(
        self, path: str | Path, record_placement: bool = True, threads: int | None = None
    ) -> ort.InferenceSession:
        """An InferenceSession for the model at `path` on the checked providers."""
        providers = self.check()
        return ort.InferenceSession(
            str(path),
            self.session_options(record_placement, threads),
            providers=[n for n, _ in providers],
            provider_options=[{k: str(v) for k, v in o.items()} for _, o in providers],
        )


class SessionPool:
    """The sessions of one exported graph, one per intra-op thread count; `session` is the one
    selected by `set_threads` (the thread budget of `partition.threads`).

    A pool that only ever uses one thread count holds one ordinary session. A second count
    on the CPU provider must not copy the weights again: the pool then writes (once, cached
    beside the graph) an optimized copy whose initializers and their pre-packed CPU-kernel
    forms live in one external file (ORT's `session.save_external_prepacked_constant_
    initializers`) and rebuilds its sessions from it. Each session memory-maps that file, so
    every thread count reads the same pages: one copy of the weights in memory.
    Other providers get a session of the original graph per count.
    """

    def __init__(self, device: OrtDevice, path: str | Path, threads: int | None = None):
        self.device, self.path = device, Path(path)
        self._threads = threads if threads is not None else device.intra_op_threads
        self._sessions: dict[int | None, ort.InferenceSession] = {}
        self._shared = False
        self._lock = threading.Lock()
        self._sessions[self._threads] = device.session(self.path, threads=self._threads)

    @property
    def threads(self) -> int | None:
        return self._threads

    @property
    def session(self) -> ort.InferenceSession:
        return self._sessions[self._threads]

    def set_threads(self, threads: int | None) -> None:
        """Run on `threads` intra-op threads from now on (builds that session once)."""
        with self._lock:
            if threads not in self._sessions:
                if self.device.on_host_cpu and not self._shared:
                    self._share_weights()
                self._sessions[threads] = self.device.session(self._source(), threads=threads)
            self._threads = threads

    @property
    def thread_counts(self) -> tuple[int | None, ...]:
        """The thread counts this pool has a session for."""
        return tuple(self._sessions)

    def _source(self) -> Path:
        return prepacked_copy(self.path, self.device) if self._shared else self.path

    def _share_weights(self) -> None:
        """Rebuild the existing sessions from the pre-packed copy (one mapped weights file)."""
        self._shared = True
        src = self._source()
        for threads in list(self._sessions):
            self._sessions[threads] = self.device.session(src, threads=threads)


def prepacked_copy(path: str | Path, device: OrtDevice) -> Path:
    """`path`'s graph optimized for this CPU and onnxruntime, initializers and their pre-packed
    forms in one external file, written once into `<graph folder>/prepacked-[<stem>-]<tag>/`.

    The tag covers the onnxruntime version, the CPU (its model name and flags: pre-packed
    layouts are kernel-specific) and the optimization level.
    """
    path = Path(path)
    stem = "" if path.stem == "model" else f"{path.stem}-"  # graphs sharing a folder
    entry = path.parent / f"prepacked-{stem}{_hardware_tag(device)}"

    def write(tmp: Path) -> None:
        so = device.session_options(record_placement=False, threads=1)
        so.optimized_model_filepath = str(tmp / "model.onnx")
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "model.onnx.data"
        )
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        so.add_session_config_entry(SAVE_PREPACKED, "1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    return cached_entry(entry, write)


def _hardware_tag(device: OrtDevice) -> str:
    cpu = ""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        lines = info.read_text().splitlines()
        cpu = "|".join(x for x in lines if x.startswith(("model name", "flags")))[:4096]
    key = json.dumps([ort.__version__, cpu, device.optimization_level])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def session_memory(session: ort.InferenceSession) -> tuple[str, int]:
    """(OrtValue device type, device id) where the session's first provider wants tensors."""
    name = session.get_providers()[0]
    options = session.get_provider_options().get(name, {})
    return DEVICE_MEMORY.get(name, "cpu"), int(options.get("device_id", 0))


def _braced(options: dict[str, Any]) -> str:
    """{'device_type': 'NPU'} -> '{device_type=NPU}'; {} -> ''."""
    return "{" + ", ".join(f"{k}={v}" for k, v in options.items()) + "}" if options else ""


def records_assignment_api() -> bool:
    """True when this onnxruntime records which provider runs each node at session creation."""
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
    if records_assignment_api() and _config(options, RECORD_ASSIGNMENT) == "1":
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


def merged_placement(sessions: Sequence[ort.InferenceSession]) -> dict[str, dict[str, int]]:
    """`node_placement` summed over several sessions (a runner made of several graphs)."""
    merged: dict[str, Counter[str]] = {}
    for session in sessions:
        for ep, ops in node_placement(session).items():
            merged.setdefault(ep, Counter()).update(ops)
    return {ep: dict(ops) for ep, ops in merged.items()}


# --- KV cache ---------------------------------------------------------------------------------
class HostKV:
    """K/V buffers (L, 1, max_len, nkv, hd) in host memory (CPU, OpenVINO, QNN, CoreML)."""

    memory = ("cpu", 0)

    def __init__(self, layers: int, shape: tuple[int, int, int, int], dtype: np.dtype):
        self.dtype = np.dtype(dtype)
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


class DeviceKV:
    """K/V buffers as OrtValues in device memory (CUDA, TensorRT, DirectML).

    Row moves run a one-node Identity graph per row with input and output bound to the two
    rows, i.e. a device-to-device copy. Only its CPU form is tested here (no GPU): force it
    with `kv_on_device=True` on a runner.
    """

    def __init__(self, layers: int, shape: tuple[int, int, int, int], dtype: np.dtype,
                 main: ort.InferenceSession):  # fmt: skip
        self.memory, self.dtype, self.row_shape = session_memory(main), np.dtype(dtype), shape[2:]
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
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


def make_kv(layers: int, max_len: int, kv_shape: tuple[int, int], dtype: np.dtype,
            main: ort.InferenceSession, on_device: bool | None) -> HostKV | DeviceKV:  # fmt: skip
    """K/V buffers where `main`'s first provider wants tensors (`on_device` None), or forced
    into OrtValues (`on_device` True: the device path, testable on a CPU)."""
    shape = (1, max_len, *kv_shape)  # per layer: (1, max_len, nkv, hd)
    if on_device or (on_device is None and session_memory(main)[0] != "cpu"):
        return DeviceKV(layers, shape, dtype, main)
    return HostKV(layers, shape, dtype)


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


def bind_kv(binding: Any, kv: HostKV | DeviceKV, layers: range, n: int, t: int) -> None:
    """past_{k,v}_i -> rows [0, n) and new_{k,v}_i -> rows [n, n + T) of layer i, in place."""
    mem = kv.memory  # (device type, id)
    past, new = (1, n, *kv.row_shape), (1, t, *kv.row_shape)
    for layer in layers:
        for kind, base in kv.pointers(layer):
            binding.bind_input(f"past_{kind}_{layer}", *mem, kv.dtype, past, base)
            end = base + n * kv.row_bytes
            binding.bind_output(f"new_{kind}_{layer}", *mem, kv.dtype, new, end)


class RowCache:
    """Length-pointer semantics of a preallocated KV cache `self.kv` (as `StaticKVCache`)."""

    length: int
    max_len: int
    name: str
    kv: HostKV | DeviceKV

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


def host(t: torch.Tensor | np.ndarray, dtype: Any) -> np.ndarray:
    """A C-contiguous numpy array of `dtype` (no copy when it already is one)."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return np.ascontiguousarray(t, dtype=dtype)


def kv_interface(
    session: ort.InferenceSession, path: str | Path
) -> tuple[tuple[int, int], np.dtype]:
    """((nkv, hd), cache dtype) of a graph with past_k_0 among its inputs; a clear error else."""
    inputs = {i.name: i for i in session.get_inputs()}
    if "past_k_0" not in inputs:
        raise ValueError(f"{path} has no KV-cache inputs (inputs {sorted(inputs)[:6]}...)")
    past = inputs["past_k_0"]
    if past.type not in NUMPY_DTYPES:
        raise ValueError(f"{path}: KV cache type {past.type} is not supported (float, float16)")
    return (int(past.shape[2]), int(past.shape[3])), np.dtype(NUMPY_DTYPES[past.type])
