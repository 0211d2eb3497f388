"""OrtSplitRunner: the target as a `SplitRunner` on ONNX Runtime, split at the exit layer ℓe.

Why: verifying a block of γ + 1 rows is what speculative decoding buys, so the target's cost
must grow slowly with rows. On CPUs without AMX, torch's fp32 GEMM (MKL on AMD) grows
almost linearly with rows while ORT's MLAS kernels stay nearly flat up to ~8 rows.

Three exported graphs (cached by `graphs.export`; fp32, or int8 / int4 weights with
`quantize`: then the plan's reference is this quantized target's own greedy decoding), one
`SessionPool` each (a session per intra-op thread count, see `ort_core`):

    prefix   input_ids (1, T) -> embed, layers [0, ℓe)       -> hidden_out (1, T, D)
    suffix   hidden (1, T, D) -> layers [ℓe, N)             -> hidden_out (1, T, D)
    head     hidden (1, T, D) -> final norm + LM head       -> logits (1, T, V)

The head graph serves both the exit head (on the prefix's hidden state) and the model's own
head (on the suffix's), so the LM head's weights (V x D: 0.9 GB fp32 for Qwen2.5-1.5B) are
held once. `forward` (prefill, plain rounds) is prefix -> suffix -> head: no whole-model graph.

The KV cache is one preallocated buffer (1, max_len, nkv, hd) per layer for all N layers,
bound in place with IOBinding exactly as `OrtRunner` does: the prefix session reads and writes
layers [0, ℓe), the suffix session layers [ℓe, N). Length semantics are `TorchRunner`'s:
`forward_prefix` writes its rows without advancing, `forward_suffix` writes the rest and
advances by T, `forward` does both.

ℓe is fixed by the exported graphs: `exit_layer` is read-only (setting the same value is
allowed, any other raises); a different ℓe needs a new runner.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from mirror_sd.devices.ort_core import OrtDevice, SessionPool
from mirror_sd.devices.ort_kv import NUMPY_DTYPES, RowCache, bind_kv, host, kv_interface, make_kv
from mirror_sd.devices.ort_placement import (
    merged_placement,
    placement_summary,
    records_assignment_api,
)
from mirror_sd.devices.row_exact import needs_padding, pad_rows
from mirror_sd.graphs.export import (
    DEFAULT_OPSET,
    QUANTIZATIONS,
    cache_key,
    cached_entry,
    export_module,
    graph_feeds,
)
from mirror_sd.graphs.layered import layers_entry, range_cached, range_entry
from mirror_sd.graphs.model import CausalLM
from mirror_sd.graphs.onnx_quant import EXTERNAL_DATA_BYTES, quantize_model

_Binding = Any  # ort.IOBinding (its class is not exported under a stable name)


class SplitGraphs(NamedTuple):
    """Paths of the three exported graphs of a target split at ℓe (see module doc)."""

    prefix: Path
    suffix: Path
    head: Path


# --- export ---------------------------------------------------------------------------------
class _Head(nn.Module):
    """Final norm + LM head as a graph: hidden (1, T, D) -> logits (1, T, V)."""

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head(hidden)


def export_head(model: CausalLM, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export the final norm + LM head of `model` to ONNX at `path` (hidden -> logits).

    `export_stages` cannot export an empty layer range (no past K/V inputs), hence this.
    """
    c, dtype = model.config, model.model.embed_tokens.weight.dtype
    example = torch.zeros(1, 3, c.hidden_size, dtype=dtype)  # (1, T, D), T = 3: stays dynamic
    params = [*model.model.norm.parameters(), *model.lm_head.parameters()]
    large = sum(p.numel() * p.element_size() for p in params) >= EXTERNAL_DATA_BYTES
    return export_module(_Head(model), (example,), path, ["hidden"], ["logits"],
                         {"hidden": {1: torch.export.Dim("T", min=1)}}, opset, large)  # fmt: skip


def head_entry(model: CausalLM, folder: str | Path, key_info: Mapping[str, Any],
               opset: int = DEFAULT_OPSET, quantize: str | None = None) -> Path:  # fmt: skip
    """The folder `export_head_cached` keeps the head in (`model` may be weightless)."""
    digest = cache_key(model, key_info, stage="norm+lm_head", opset=opset, quantize=quantize)
    quant = f"-{quantize}" if quantize else ""
    return Path(folder) / f"{model.config.model_type}-head{quant}-{digest[:16]}"


def export_head_cached(
    model: CausalLM,
    folder: str | Path,
    key_info: Mapping[str, Any],
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
) -> Path:
    """`export_head` into `folder` (+ `quantize_weights` for int8 / int4), reusing an earlier
    identical export (as `export_cached`: `folder/<type>-head[-q]-<hash>/model.onnx`, written
    in a temporary directory, renamed into place, its mtime touched on reuse for `cache prune`).
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r}: expected one of {QUANTIZATIONS}")
    entry = head_entry(model, folder, key_info, opset, quantize)
    if quantize and not (entry / "model.onnx").is_file():
        src = export_head_cached(model, folder, key_info, opset)
        return cached_entry(entry, lambda tmp: quantize_model(src, tmp / "model.onnx", quantize))
    return cached_entry(entry, lambda tmp: export_head(model, tmp / "model.onnx", opset))


def export_split(
    model: CausalLM,
    folder: str | Path,
    key_info: Mapping[str, Any],
    exit_layer: int,
    quantize: str | None = None,
) -> SplitGraphs:
    """Export (or find in the cache `folder`) the prefix, suffix and head graphs for ℓe, with
    `quantize` (None | "int8" | "int4") weights.

    `key_info` is the weights' identity, e.g. `export.source_identity(model_folder)`.

    Raises:
        ValueError: ℓe is outside [1, N - 1].
    """
    n = model.num_layers
    if not 1 <= exit_layer < n:
        raise ValueError(f"exit_layer {exit_layer} outside [1, {n - 1}]")
    # the head first: its export copies the LM head's weights while few of the model's pages
    # are resident yet (torch's exporter keeps every exported weight referenced: an export
    # process only grows, so the biggest transient goes first)
    head = export_head_cached(model, folder, key_info, quantize=quantize)
    return SplitGraphs(
        prefix=range_cached(model, folder, key_info, 0, exit_layer, True, quantize),
        suffix=range_cached(model, folder, key_info, exit_layer, n, False, quantize),
        head=head,
    )


def split_needs_weights(model: CausalLM, folder: str | Path, key_info: Mapping[str, Any],
                        exit_layer: int, quantize: str | None = None) -> bool:  # fmt: skip
    """Whether `export_split` would run torch's exporter, i.e. needs the real weights. When
    False a weightless `model` (built on the meta device) will do: every graph is cached, or
    is assembled / quantized from cached ONNX files without torch."""
    layers = layers_entry(model, folder, key_info) / "model.onnx"  # fp32 ranges live there
    ranges = [(0, exit_layer, True), (exit_layer, model.num_layers, False)]
    ranges_ok = (
        layers.is_file()
        or bool(quantize)
        and all(range_entry(model, folder, key_info, *r, quantize).is_file() for r in ranges)
    )
    heads = [
        head_entry(model, folder, key_info, quantize=q) / "model.onnx" for q in {quantize, None}
    ]
    return not (ranges_ok and any(h.is_file() for h in heads))


# --- runner ---------------------------------------------------------------------------------
class OrtSplitRunner(RowCache):
    """`SplitRunner` for a target on an `OrtDevice`, split at ℓe (see module doc).

    `model` is used only to export (or find) the graphs; the runner keeps no reference to it,
    so the caller may free the torch weights afterwards. When all three graphs are already in
    `cache_dir` only its config is read, so a weightless model (`with torch.device("meta"):
    CausalLM(cfg)`) skips loading the weights. `key_info` identifies the weights
    (`export.source_identity(folder)`); `cache_dir` holds the exports. `kv_on_device` is
    `OrtRunner`'s: None keeps the cache where the first provider wants its tensors.
    `placement` says which providers run the three graphs' nodes.

    Raises:
        ValueError: ℓe outside [1, N - 1], or an unsupported cache dtype.
    """

    def __init__(self, model: CausalLM, key_info: Mapping[str, Any], cache_dir: str | Path,
                 exit_layer: int, max_len: int, device: OrtDevice, name: str = "target",
                 alias: str | None = None, kv_on_device: bool | None = None,
                 quantize: str | None = None):  # fmt: skip
        graphs = export_split(model, cache_dir, key_info, exit_layer, quantize)
        self._open(graphs, model.num_layers, model.config.hidden_size, exit_layer, max_len,
                   device, name, alias, kv_on_device, quantize)  # fmt: skip

    @classmethod
    def from_graphs(cls, graphs: SplitGraphs, n_layers: int, hidden_size: int, exit_layer: int,
                    max_len: int, device: OrtDevice, name: str = "target",
                    alias: str | None = None, kv_on_device: bool | None = None,
                    quantize: str | None = None) -> OrtSplitRunner:  # fmt: skip
        """A runner over graphs already exported (`export_split`), so that the torch model
        can be freed before the sessions load: compile() keeps only one copy of the target's
        weights in memory at a time."""
        runner = cls.__new__(cls)
        runner._open(graphs, n_layers, hidden_size, exit_layer, max_len, device, name, alias,
                     kv_on_device, quantize)  # fmt: skip
        return runner

    def _open(self, graphs: SplitGraphs, n_layers: int, hidden_size: int, exit_layer: int,
              max_len: int, device: OrtDevice, name: str, alias: str | None,
              kv_on_device: bool | None, quantize: str | None) -> None:  # fmt: skip
        if not 1 <= exit_layer < n_layers:
            raise ValueError(f"exit_layer {exit_layer} outside [1, {n_layers - 1}]")
        self.quantize = quantize
        self.graphs, self.device = graphs, device
        self.pools = {
            "prefix": SessionPool(device, graphs.prefix),
            "suffix": SessionPool(device, graphs.suffix),
            "head": SessionPool(device, graphs.head),
        }
        self._exit_layer, self.n_layers = exit_layer, n_layers
        self.max_len, self.length = max_len, 0
        kv_shape, self.dtype = kv_interface(self.prefix, graphs.prefix)
        self.hidden_size = hidden_size
        self.vocab_size = int(self.head.get_outputs()[0].shape[2])
        self.logits_dtype = np.dtype(NUMPY_DTYPES[self.head.get_outputs()[0].type])
        self.pad = needs_padding(quantize)  # lone rows decode as blocks of two (`row_exact`)
        self._last_feeds: tuple[torch.Tensor, dict[str, np.ndarray]] | None = None
        rows = max_len + self.pad  # room for a padded last row's throw-away K/V
        self.kv = make_kv(self.n_layers, rows, kv_shape, self.dtype, self.prefix, kv_on_device)
        where = f"{alias} ({device.describe()})" if alias else device.describe()
        self.name = f"{name} on {where}"
        self.placement = self._placement()

    # --- sessions and threads -----------------------------------------------------------------
    @property
    def prefix(self) -> ort.InferenceSession:
        return self.pools["prefix"].session

    @property
    def suffix(self) -> ort.InferenceSession:
        return self.pools["suffix"].session

    @property
    def head(self) -> ort.InferenceSession:
        return self.pools["head"].session

    @property
    def threads(self) -> int | None:
        """Intra-op threads of the next stage runs (None: ORT's default, every core)."""
        return self.pools["prefix"].threads

    def set_threads(self, threads: int | None) -> None:
        """Run the next stages on `threads` intra-op threads (the thread budget's call)."""
        for pool in self.pools.values():
            pool.set_threads(threads)

    # --- ℓe ---------------------------------------------------------------------------------
    @property
    def exit_layer(self) -> int:
        """ℓe, fixed by the exported graphs: a different ℓe needs a new runner."""
        return self._exit_layer

    @exit_layer.setter
    def exit_layer(self, value: int) -> None:
        if int(value) != self._exit_layer:
            raise ValueError(
                f"{self.name}: exit_layer is {self._exit_layer}, fixed by its exported ONNX "
                f"graphs; it cannot change to {value} on this runner: recompile the plan with "
                f"exit_layer={value} (a new OrtSplitRunner exports the graphs for it)"
            )

    # --- SplitRunner ------------------------------------------------------------------------
    def forward(
        self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """ids, position_ids (1, T) int64; mask (1, T, length + T) bool -> logits (T, V) fp32.

        Appends the T rows' K/V for every layer (length += T).
        """
        hidden = self._run_prefix(ids, position_ids, mask)
        return self._logits(self._run_suffix(hidden, position_ids, mask))

    def fill(self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Prefix -> suffix on new rows without the head: their K/V only (length += T)."""
        self._run_suffix(self._run_prefix(ids, position_ids, mask), position_ids, mask)

    def forward_prefix(
        self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Layers [0, ℓe) on new rows -> hidden (1, T, D); writes their K/V, length unchanged."""
        return torch.from_numpy(self._run_prefix(ids, position_ids, mask))

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Exit head (final norm + LM head) on hidden (1, T, D) -> logits (T, V) fp32."""
        return self._logits(host(hidden, self.dtype))

    def forward_suffix(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Layers [ℓe, N) + head on the prefix's hidden (1, T, D) -> logits (T, V) fp32.

        Writes these layers' K/V rows and advances the cache (length += T).
        """
        return self._logits(self._run_suffix(host(hidden, self.dtype), position_ids, mask))

    # --- stages -----------------------------------------------------------------------------
    def _run_prefix(self, ids, position_ids, mask) -> np.ndarray:
        """Prefix session on ids (1, T) -> hidden (1, T, D); K/V rows of layers [0, ℓe)."""
        t = self._check(ids.shape[1], mask)
        if t == 1 and self.pad:  # a lone row takes the block kernel (`row_exact`)
            ids, position_ids, mask = pad_rows(host(ids, np.int64), position_ids, mask)
        binding = self.prefix.io_binding()
        binding.bind_cpu_input("input_ids", host(ids, np.int64))
        layers = range(self._exit_layer)
        return self._run_layers(self.prefix, binding, layers, position_ids, mask)[:, :t]

    def _run_suffix(self, hidden: np.ndarray, position_ids, mask) -> np.ndarray:
        """Suffix session on hidden (1, T, D) -> hidden (1, T, D); K/V rows of [ℓe, N);
        advances the cache by T."""
        t = self._check(hidden.shape[1], mask)
        if t == 1 and self.pad:
            hidden, position_ids, mask = pad_rows(hidden, position_ids, mask)
        binding = self.suffix.io_binding()
        binding.bind_cpu_input("hidden", np.ascontiguousarray(hidden))
        layers = range(self._exit_layer, self.n_layers)
        out = self._run_layers(self.suffix, binding, layers, position_ids, mask)[:, :t]
        self.length += t
        return out

    def _run_layers(self, session: ort.InferenceSession, binding: _Binding, layers: range,
                    position_ids, mask) -> np.ndarray:  # fmt: skip
        """Bind positions, mask and the layers' K/V in place; run; return hidden (1, T, D)."""
        t = mask.shape[1]
        binding.bind_cpu_input("position_ids", host(position_ids, np.int64))
        for name, value in self._feeds(mask).items():
            binding.bind_cpu_input(name, value)
        bind_kv(binding, self.kv, layers, self.length, t)
        out = np.empty((1, t, self.hidden_size), self.dtype)  # (1, T, D)
        binding.bind_output("hidden_out", "cpu", 0, self.dtype, out.shape, out.ctypes.data)
        session.run_with_iobinding(binding)
        return out

    def _feeds(self, mask: torch.Tensor) -> dict[str, np.ndarray]:
        """The grouped-attention inputs for `mask` (`export.graph_feeds`), regrouped once for
        the prefix and the suffix of one forward (the same mask: a comparison, not a regroup)."""
        mask = torch.as_tensor(mask)
        if self._last_feeds is not None:
            last, feeds = self._last_feeds
            if last.shape == mask.shape and torch.equal(last, mask):
                return feeds
        self._last_feeds = (mask, graph_feeds(mask))
        return self._last_feeds[1]

    def _logits(self, hidden: np.ndarray) -> torch.Tensor:
        """Head session on hidden (1, T, D) -> logits (T, V) float32."""
        t = hidden.shape[1]
        if t == 1 and self.pad:
            hidden = np.concatenate([hidden, hidden], axis=1)
        binding = self.head.io_binding()
        binding.bind_cpu_input("hidden", np.ascontiguousarray(hidden))
        logits = np.empty((1, hidden.shape[1], self.vocab_size), self.logits_dtype)  # (1, T, V)
        out = ("cpu", 0, self.logits_dtype, logits.shape, logits.ctypes.data)
        binding.bind_output("logits", *out)
        self.head.run_with_iobinding(binding)
        return torch.from_numpy(logits[0, :t]).float()  # (T, V)

    def _placement(self) -> str:
        """Which providers run the three graphs' nodes (a summary; warns on fallbacks)."""
        if not records_assignment_api():  # older ORT: the profile needs one run of each
            one = torch.zeros(1, 1, dtype=torch.long)
            self.forward(one, one, torch.ones(1, 1, 1, dtype=torch.bool))  # writes row 0 only
            self.length = 0
        placement = merged_placement((self.prefix, self.suffix, self.head))
        return placement_summary(placement, self.prefix.get_providers()[0], self.name)
