"""OrtRunner: a whole exported model (embed..head) as a `ModelRunner` on an `OrtDevice`.

Its KV cache is preallocated per layer as (1, max_len, nkv, hd); every forward binds
`past_*_i` as a pointer to rows [0, length) and `new_*_i` as a pointer to rows
[length, length + T) of the same buffer (IOBinding, `ort_kv.bind_kv`), so ORT reads and
writes the cache in place: only ids, positions and the mask go in and only the logits come
out. Sessions and threads come from `ort_core`, KV buffers from `ort_kv`, placement from
`ort_placement`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mirror_sd.devices.ort_core import OrtDevice
from mirror_sd.devices.ort_kv import NUMPY_DTYPES, RowCache, bind_kv, host, make_kv
from mirror_sd.devices.ort_placement import (
    node_placement,
    placement_summary,
    records_assignment_api,
)
from mirror_sd.devices.shared_sessions import session_pool
from mirror_sd.graphs.export import graph_feeds

FILL_GRAPH_ROWS = 16  # a fill of at least this many rows runs on the fill graph (a prompt);
# shorter ones (a round's catch-up) on the runner's own, as fast there at a few rows


class OrtRunner(RowCache):
    """`ModelRunner` for an exported whole model (input_ids .. logits) on an `OrtDevice`.

    `kv_on_device` None keeps the cache where the first provider wants its tensors (device
    memory for CUDA / TensorRT / DirectML, host memory otherwise); True forces OrtValue buffers.
    `placement` says which providers run the graph's nodes (see `node_placement`). Inside
    `shared_sessions()` runners of the same graph share its sessions (the KV cache and the
    length stay each runner's own).

    `fill_graph`: the same model exported at another weight format (its K/V layout the same):
    `fill` of FILL_GRAPH_ROWS rows or more runs there, writing the shared cache (a draft's
    prompt through a faster many-row GEMM, its decoding steps through this graph).
    """

    def __init__(self, path: str | Path, device: OrtDevice, max_len: int, name: str = "draft",
                 alias: str | None = None, kv_on_device: bool | None = None,
                 fill_graph: str | Path | None = None):  # fmt: skip
        self.sessions = session_pool(device, path)  # shared inside shared_sessions()
        self.fill_sessions = session_pool(device, fill_graph) if fill_graph else None
        self.fill_graph = Path(fill_graph) if fill_graph else None  # `persistence.save` copies it
        self.device, self.max_len, self.length = device, max_len, 0
        self.n_layers, kv_shape, self.dtype = _interface(self.session, path)
        self.vocab_size = int(self.session.get_outputs()[0].shape[2])
        # graphs exported before the input (or made elsewhere) score every row: no cheap fill
        self.picks_rows = _picks_rows(self.session)
        self.fill_picks_rows = self.fill_sessions is not None and _picks_rows(
            self.fill_sessions.session
        )
        self.kv = make_kv(self.n_layers, max_len, kv_shape, self.dtype, self.session, kv_on_device)
        where = f"{alias} ({device.describe()})" if alias else device.describe()
        self.name = f"{name} on {where}"
        if not records_assignment_api():  # the profile needs one run; it writes row 0 only
            self.forward(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                         torch.ones(1, 1, 1, dtype=torch.bool))  # fmt: skip
            self.length = 0
        placement = node_placement(self.session)
        self.placement = placement_summary(placement, self.session.get_providers()[0], self.name)
        if self.fill_sessions is not None:
            _check_fill_graph(self.fill_sessions.session, self.session, fill_graph)

    @property
    def session(self) -> ort.InferenceSession:
        """The session of the current thread count."""
        return self.sessions.session

    @property
    def threads(self) -> int | None:
        """Intra-op threads of the next forward (None: ORT's default, every core)."""
        return self.sessions.threads

    def set_threads(self, threads: int | None) -> None:
        """Run the next forwards on `threads` intra-op threads (the thread budget's call)."""
        self.sessions.set_threads(threads)
        if self.fill_sessions is not None:
            self.fill_sessions.set_threads(threads)

    def forward(
        self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """ids, position_ids (1, T) int64; mask (1, T, length + T) bool -> logits (T, V) fp32.

        Appends the T rows' K/V to the cache (length += T)."""
        return self._run(ids, position_ids, mask, None)

    def fill(self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """`forward` without the logits (a prefill): the graph's LM head runs on the last row
        only (`logits_rows`), not on all T. (ORT runs a graph's head even when only its K/V
        outputs are fetched: checked with `only_execute_path_to_fetches`, all 169
        MatMulNBits of the 0.5B ran; hence the input.)"""
        pool = self.fill_sessions if ids.shape[1] >= FILL_GRAPH_ROWS else None
        self._run(ids, position_ids, mask, ids.shape[1] - 1, pool)

    def _run(self, ids, position_ids, mask, last: int | None, pool=None) -> torch.Tensor:
        """`forward`, with `last` the one row whose logits come out (None: every row), on
        `pool`'s session (None: the runner's own graph)."""
        t, n = self._check(ids.shape[1], mask), self.length
        session = (pool or self.sessions).session
        picks_rows = self.picks_rows if pool is None else self.fill_picks_rows
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", host(ids, np.int64))
        binding.bind_cpu_input("position_ids", host(position_ids, np.int64))
        for name, value in graph_feeds(mask).items():  # grouped rows (export.graph_feeds)
            binding.bind_cpu_input(name, value)
        bind_kv(binding, self.kv, range(self.n_layers), n, t)
        rows = np.arange(t) if last is None or not picks_rows else np.array([last])
        if picks_rows:
            binding.bind_cpu_input("logits_rows", rows.astype(np.int64))
        logits = np.empty((1, len(rows), self.vocab_size), self.dtype)  # (1, O, V)
        binding.bind_output("logits", "cpu", 0, self.dtype, logits.shape, logits.ctypes.data)
        session.run_with_iobinding(binding)
        self.length = n + t
        return torch.from_numpy(logits[0]).float()  # (O, V)


def _picks_rows(session: ort.InferenceSession) -> bool:
    return any(i.name == "logits_rows" for i in session.get_inputs())


def _check_fill_graph(fill: ort.InferenceSession, own: ort.InferenceSession, path) -> None:
    """The fill graph writes the runner's cache: the same K/V inputs, shapes and types."""

    def kv(s):
        return [(i.name, i.type, i.shape[2:]) for i in s.get_inputs() if i.name.startswith("past")]

    if kv(fill) != kv(own):
        raise ValueError(
            f"fill graph {path}: its K/V cache differs from the runner's graph "
            "(another model?); export the same model at the prefill format"
        )


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
    if past.type not in NUMPY_DTYPES:
        raise ValueError(f"{path}: KV cache type {past.type} is not supported (float, float16)")
    return n_layers, (int(past.shape[2]), int(past.shape[3])), np.dtype(NUMPY_DTYPES[past.type])
