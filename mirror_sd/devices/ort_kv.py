"""The KV cache of the ONNX Runtime runners: preallocated buffers bound in place.

    HostKV/DeviceKV  preallocated K/V buffers, one (1, max_len, nkv, hd) per layer, in host or
                     device memory (`make_kv` picks where the session's provider wants them)
    bind_kv          binds a layer range's past_*/new_* to rows [0, n) / [n, n + T) in place
    RowCache         length-pointer semantics over them (as graphs.kv_cache.StaticKVCache)
    kv_interface     the cache shape and dtype an exported graph takes

No cache bytes cross per token: ORT reads rows [0, n) and writes rows [n, n + T) of the same
buffer, and rollback moves a length pointer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mirror_sd.backends.facts import HOST_MEMORY, PROVIDER_MEMORY
from mirror_sd.graphs.kv_cache import CacheFullError

NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_memory(session: ort.InferenceSession) -> tuple[str, int]:
    """(OrtValue device type, device id) where the session's first provider wants tensors."""
    name = session.get_providers()[0]
    options = session.get_provider_options().get(name, {})
    return PROVIDER_MEMORY.get(name, HOST_MEMORY), int(options.get("device_id", 0))


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
