"""Export a range of a `CausalLM`'s stages to ONNX, quantize it (int8 / int4), cache the files.

The exported graph runs the *same* module code as torch (`CausalLM.embed`, `.rope`,
`.model.layers[i]`, `.head`), wrapped in a small `nn.Module`, so ONNX Runtime and torch
agree to float rounding. Its interface, for layers [first, last):

    inputs   input_ids (1, T) int64          if with_embed, else  hidden (1, T, D)
             position_ids (1, T) int64
             mask (G, R, L) bool              True = attend, per group of rows (below)
             key_index (G, L), row_index (G, R), row_slot (T,) int64
             logits_rows (O,) int64           if with_head: the rows whose logits come out
             past_k_{i}, past_v_{i} (1, S, nkv, hd) for each layer i
    outputs  logits (1, O, V)                 if with_head, else  hidden_out (1, T, D)
             new_k_{i}, new_v_{i} (1, T, nkv, hd) for each layer i

T >= 1, S >= 0 and O >= 1 are dynamic (S = 0 is a prefill). `logits_rows` is arange(T) for
every row's logits; a prefill asks for one row and so skips the LM head on the others (on the
0.5B draft the head is a quarter of the weights, and its (T, V) logits for a long prompt are
hundreds of MB). The block's mask over its S + T keys
comes regrouped (`masks.group_rows`, `graph_feeds`): rows whose visible keys are one prefix
of a common key list form a group, so a packed batch's sequence or a tree's path attends over
its own keys as a contiguous prefix, bit for bit as it would alone (docs/runtime.md, *Row
invariance*); one lone sequence is one group over all S + T keys. Exporter: torch's `torch.export`-based
one (`dynamo=True`, the supported exporter since torch 2.9): it handles S = 0, GQA's
repeat_interleave, Qwen2 biases and Qwen3 qk-norm, writes a graph half the size of the
TorchScript exporter's, and saves large models with one external-data file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from mirror_sd import progress
from mirror_sd.graphs.masks import Grouped, causal_mask, group_rows
from mirror_sd.graphs.model import CausalLM
from mirror_sd.graphs.onnx_quant import (
    EXTERNAL_DATA_BYTES,
    entry_label,
    quantize_int4,
    quantize_int7_rows,
    quantize_int8,
    quantize_int8_rows,
)

DEFAULT_OPSET = 18  # widest EP support (OpenVINO, QNN, CoreML, DirectML) with the new exporter
EXPORT_FORMAT_VERSION = 4  # bump when the exported interface or wrapper changes (4: grouped rows)
HEAD_FORMAT_VERSION = 2  # in the key of graphs with the head only (2: the logits_rows input)
QUANTIZATIONS = (None, "int8", "int4", "int8-rows", "int7-rows")
# torch's ONNX exporter warns through this logger, on every export, about each torchvision op
# it cannot register ("torchvision is not installed. Skipping torchvision::nms"): noise here
EXPORTER_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"


class _Stages(nn.Module):
    """Layers [first, last) of a `CausalLM` as one pure function of tensors (see module doc)."""

    def __init__(self, model: CausalLM, first: int, last: int, with_embed: bool, with_head: bool):
        super().__init__()
        self.model = model
        self.first, self.last = first, last
        self.with_embed, self.with_head = with_embed, with_head

    def forward(self, x, position_ids, mask, key_index, row_index, row_slot, *past):
        """x: ids (1, T) or hidden (1, T, D); mask and indices: `masks.Grouped`'s fields;
        past: k, v (1, S, nkv, hd) per layer, interleaved."""
        h, new = self.layers(x, position_ids, mask, key_index, row_index, row_slot, past)
        return (h, *new)

    def layers(self, x, position_ids, mask, key_index, row_index, row_slot, past):
        """(hidden (1, T, D) after the range's layers, [new k, v per layer])."""
        h = self.model.embed(x) if self.with_embed else x  # (1, T, D)
        cos, sin = self.model.rope(position_ids, h.dtype)  # (1, T, hd)
        bias = Grouped(additive_mask(mask, h.dtype), key_index, row_index, row_slot)
        new: list[torch.Tensor] = []
        for j, i in enumerate(range(self.first, self.last)):
            layer = self.model.model.layers[i]
            h, k, v = layer(h, cos, sin, bias, past[2 * j], past[2 * j + 1])
            new += [k, v]  # (1, T, nkv, hd) each
        return h, new


class _WithHead(_Stages):
    """`_Stages` ending in the final norm + LM head, on the rows `logits_rows` names only."""

    def forward(self, x, position_ids, mask, key_index, row_index, row_slot, logits_rows, *past):
        h, new = self.layers(x, position_ids, mask, key_index, row_index, row_slot, past)
        return (self.model.head(h[:, logits_rows]), *new)  # (1, O, V)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bool mask (True = attend) as an additive one: 0 or the dtype's min. Softmax gives
    the same weights (exp underflows to exactly 0), and the exporter then emits no IsNaN guard
    for fully masked rows, an op OpenVINO's EP leaves to the CPU in every layer."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


GROUP_INPUTS = ("mask", *Grouped._fields[1:])  # mask, key_index, row_index, row_slot


def graph_feeds(mask: torch.Tensor) -> dict[str, np.ndarray]:
    """The grouped-attention inputs of an exported graph for a block's mask (1, T, S + T) bool
    (`masks.group_rows`), by input name."""
    g = group_rows(torch.as_tensor(mask))
    return {name: np.ascontiguousarray(v.numpy()) for name, v in zip(GROUP_INPUTS, g, strict=True)}


def example_groups(s: int, t: int) -> tuple[torch.Tensor, ...]:
    """Export samples of the grouped inputs for a block of t >= 3 rows over s cached keys:
    two groups (no dimension 0 or 1, and none equal to another, so all stay dynamic)."""
    mask = causal_mask(s, t)
    mask[0, t - 1, : s // 2] = False  # the last row reads another key list: a second group
    g = group_rows(mask)  # G = 2, R = t - 1: padded to R = t + 1 slots, a valid grouping too
    pad = t + 1 - g.row_index.shape[1]
    return (
        torch.cat([g.mask, g.mask[:, -1:].expand(-1, pad, -1)], dim=1),
        g.key_index,
        torch.cat([g.row_index, g.row_index[:, -1:].expand(-1, pad)], dim=1),
        torch.where(g.row_slot >= g.row_index.shape[1], g.row_slot + pad, g.row_slot),
    )


def group_shapes(t: Any) -> dict[str, Any]:
    """Dynamic dimensions of the grouped inputs (T: the block's rows)."""
    groups, rows, keys = (torch.export.Dim(n, min=1) for n in ("G", "R", "L"))
    return {
        "mask": {0: groups, 1: rows, 2: keys},
        "key_index": {0: groups, 1: keys},
        "row_index": {0: groups, 1: rows},
        "row_slot": {0: t},
    }


def io_names(
    first: int, last: int, with_embed: bool, with_head: bool
) -> tuple[list[str], list[str]]:
    """Input and output names of an exported stage range, in graph order."""
    layers = range(first, last)
    kv = [f"{p}_{kv}_{i}" for i in layers for p, kv in (("past", "k"), ("past", "v"))]
    rows = ["logits_rows"] if with_head else []
    inputs = ["input_ids" if with_embed else "hidden", "position_ids", *GROUP_INPUTS, *rows, *kv]
    new = [f"new_{kv}_{i}" for i in layers for kv in ("k", "v")]
    return inputs, ["logits" if with_head else "hidden_out", *new]


def _example_inputs(model: CausalLM, n_layers: int, with_embed: bool,
                    with_head: bool = False) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Sample inputs with S=5, T=3, O=2 (no dimension 0 or 1, and none equal: the exporter keeps
    each dynamic)."""
    c, s, t = model.config, 5, 3
    dtype = model.model.embed_tokens.weight.dtype
    if with_embed:
        x = torch.zeros(1, t, dtype=torch.long)  # (1, T) ids
    else:
        x = torch.zeros(1, t, c.hidden_size, dtype=dtype)  # (1, T, D)
    # distinct tensors: the exporter would treat one tensor passed twice as one input
    past = [torch.zeros(1, s, c.num_kv_heads, c.head_dim, dtype=dtype) for _ in range(2 * n_layers)]
    rows = (torch.tensor([0, t - 1]),) if with_head else ()
    return (x, torch.arange(s, s + t)[None], *example_groups(s, t), *rows, *past)


def _dynamic_shapes(n_layers: int, with_head: bool = False) -> dict[str, Any]:
    t = torch.export.Dim("T", min=1)
    s = torch.export.Dim("S", min=0)
    rows = {"logits_rows": {0: torch.export.Dim("O", min=1)}} if with_head else {}
    return {
        "x": {1: t},
        "position_ids": {1: t},
        **group_shapes(t),
        **rows,
        "past": tuple({1: s} for _ in range(2 * n_layers)),
    }


def _weight_bytes(model: CausalLM, first: int, last: int, with_embed: bool, with_head: bool) -> int:
    """Bytes of the weights an export of this range holds (tied weights counted once)."""
    parts: list[nn.Module] = list(model.model.layers[first:last])
    parts += [model.model.embed_tokens] if with_embed else []
    parts += [model.model.norm, model.lm_head] if with_head else []
    unique = {p.data_ptr(): p.numel() * p.element_size() for m in parts for p in m.parameters()}
    return sum(unique.values())


def export_stages(
    model: CausalLM,
    path: str | Path,
    first: int,
    last: int,
    with_embed: bool,
    with_head: bool,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> Path:
    """Export layers [first, last) of `model` (plus embed / final norm + head) to ONNX at `path`.

    `external_data` None decides by size: weights of 1 GiB or more are written to one file
    `<path>.data` beside the graph (protobuf caps a single file at 2 GB). Returns `path`.

    Raises:
        IndexError: the layer range lies outside [0, num_layers].
    """
    if not 0 <= first <= last <= model.num_layers:
        raise IndexError(f"layer range [{first}, {last}) outside [0, {model.num_layers}]")
    wrapper = (_WithHead if with_head else _Stages)(model, first, last, with_embed, with_head)
    inputs, outputs = io_names(first, last, with_embed, with_head)
    args = _example_inputs(model, last - first, with_embed, with_head)
    if external_data is None:
        external_data = (
            _weight_bytes(model, first, last, with_embed, with_head) >= EXTERNAL_DATA_BYTES
        )
    return export_module(wrapper, args, path, inputs, outputs,
                         _dynamic_shapes(last - first, with_head), opset,
                         external_data)  # fmt: skip


def export_module(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: str | Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: Any,
    opset: int = DEFAULT_OPSET,
    external_data: bool = False,
) -> Path:
    """`module(*args)` to ONNX at `path` with torch's exporter (`dynamo=True`), its registry
    warnings silenced (`quiet_exporter`). `dynamic_shapes` maps `forward`'s argument names to
    {axis: Dim}. With `external_data` the weights go to one file `<path>.data`. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(module, args, input_names, output_names, dynamic_shapes, opset)
    program.save(str(path), external_data=external_data)
    return path


def export_program(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: Any,
    opset: int = DEFAULT_OPSET,
    optimize: bool = True,
) -> torch.onnx.ONNXProgram:
    """The `torch.onnx.ONNXProgram` of `module(*args)` (the one exporter call every export
    makes; see `export_module`). `optimize` False keeps the graph as traced, each weight an
    initializer named by its parameter's name (no constant folding yet): a template other
    weights can be applied to (`layered`, one export per kind of layer)."""
    with warnings.catch_warnings(), quiet_exporter(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore", UserWarning)  # the exporter's notes on axis names
        warnings.simplefilter("ignore", FutureWarning)  # and on torch's own deprecations
        return torch.onnx.export(
            module.eval(),
            args,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            optimize=optimize,
            verbose=False,
        )


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """Drop the WARNING records of torch's exporter op registry (`EXPORTER_REGISTRY_LOGGER`)
    while the block runs: its "torchvision is not installed. Skipping torchvision::nms" lines
    on every export. Only that logger and only its warnings; its errors still show."""
    logger = logging.getLogger(EXPORTER_REGISTRY_LOGGER)
    drop = _DropWarnings()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class _DropWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno != logging.WARNING


def source_identity(folder: str | Path) -> dict[str, Any]:
    """Identity of a model folder's weights for `export_cached`: name, size and mtime of each
    config / safetensors file (cheap; no hashing of gigabytes)."""
    folder = Path(folder).resolve()
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("config.json")])
    return {
        "folder": str(folder),
        "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files],
    }


def cache_key(model: CausalLM, key_info: Mapping[str, Any], **settings: Any) -> str:
    """A hex digest of everything an exported file depends on (see `export_cached`)."""
    parts = {
        # the config without the path it was read from: `key_info` identifies the weights
        "config": {
            k: v for k, v in model.config.hf_config.to_dict().items() if k != "_name_or_path"
        },
        "weights": dict(key_info),
        "dtype": str(model.model.embed_tokens.weight.dtype),
        "settings": settings,
        "format": EXPORT_FORMAT_VERSION,
        **({"head_format": HEAD_FORMAT_VERSION} if settings.get("with_head") else {}),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
    }
    if settings.get("quantize"):
        import onnxruntime

        parts["versions"]["onnxruntime"] = onnxruntime.__version__
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def publish(tmp: Path, entry: Path) -> None:
    """Rename a finished temporary export folder into its cache entry (atomic)."""
    try:
        os.replace(tmp, entry)
    except OSError:  # another process finished the same entry first; theirs is as good
        if not (entry / "model.onnx").is_file():
            raise


def export_cached(
    model: CausalLM,
    folder: str | Path,
    key_info: Mapping[str, Any],
    first: int = 0,
    last: int | None = None,
    with_embed: bool = True,
    with_head: bool = True,
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    label: str = "",
    keep_source: bool = True,
) -> Path:
    """`export_stages` (+ `quantize_int8` / `quantize_int4`) into `folder`, reusing an earlier
    identical export (the same file for a draft and a target: `quantize_weights`).

    A quantized entry is made from the unquantized entry of the same range, itself cached;
    without `keep_source` an unquantized entry this call had to make is removed once the
    quantized one exists (disk: the 0.5B draft's fp32 export is 2.5 GB, its int8 0.7 GB; a
    later call for another quantization exports it again).
    `label` only makes the folder name readable (e.g. "-v16384" for a trimmed head); whatever
    distinguishes the weights must be in `key_info`, which the hash covers.

    The entry is `folder/<name>-<hash>/model.onnx` (+ `model.onnx.data`), the hash covering the
    model config, `key_info` (the weights' identity, e.g. `source_identity(model_folder)`), the
    layer range, embed/head, dtype, quantization, opset and exporter versions. An entry is
    written in a temporary directory and renamed into place, so a crash never leaves a half
    file that a later call would trust. Returns the path of `model.onnx`.

    Raises:
        ValueError: `quantize` is not one of QUANTIZATIONS.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r}: expected one of {QUANTIZATIONS}")
    last = model.num_layers if last is None else last
    settings = dict(first=first, last=last, with_embed=with_embed, with_head=with_head,
                    quantize=quantize, opset=opset)  # fmt: skip
    entry = _entry(model, folder, key_info, settings, label)
    made_src = False
    if quantize and not (entry / "model.onnx").is_file():  # from the cached unquantized range
        fp32 = _entry(model, folder, key_info, {**settings, "quantize": None}, label)
        made_src = not (fp32 / "model.onnx").is_file()
        src = export_cached(
            model, folder, key_info, first, last, with_embed, with_head, None, opset, label
        )

    def write(tmp: Path) -> None:
        if quantize:  # looked up at call time, so tests can replace either function
            fn = {"int8": quantize_int8, "int4": quantize_int4, "int8-rows": quantize_int8_rows,
                  "int7-rows": quantize_int7_rows}[quantize]  # fmt: skip
            fn(src, tmp / "model.onnx")
        else:
            with progress.step(f"exporting {entry_label(entry / 'model.onnx')}"):
                export_stages(model, tmp / "model.onnx", first, last, with_embed, with_head, opset)

    path = cached_entry(entry, write)
    if made_src and not keep_source:
        shutil.rmtree(src.parent, ignore_errors=True)
    return path


def _entry(model: CausalLM, folder: str | Path, key_info: Mapping[str, Any],
           settings: dict[str, Any], label: str) -> Path:  # fmt: skip
    """The folder of `export_cached`'s entry for these settings."""
    digest = cache_key(model, key_info, **settings)[:16]
    quantize = settings["quantize"]
    quant = f"-{quantize}" if quantize else ""  # int8 entries keep their pre-int4 names and hashes
    name = f"{model.config.model_type}{label}-{settings['first']}-{settings['last']}{quant}"
    return Path(folder) / f"{name}-{digest}"


def find_cached(model: CausalLM, folder: str | Path, key_info: Mapping[str, Any],
                quantize: str | None = None) -> Path | None:  # fmt: skip
    """The `model.onnx` of the cached whole-model export `export_cached(model, folder,
    key_info, quantize=quantize)` would return (its use recorded, as a reuse is), or None
    when it is not cached. `model` may be weightless: only its config and dtype enter the key.
    """
    settings = dict(first=0, last=model.num_layers, with_embed=True, with_head=True,
                    quantize=quantize, opset=DEFAULT_OPSET)  # fmt: skip
    entry = _entry(model, folder, key_info, settings, "")
    if not (entry / "model.onnx").is_file():
        return None
    os.utime(entry)  # last use, for `mirror-sd cache prune` (graphs.export_cache)
    return entry / "model.onnx"


def cached_entry(entry: Path, write: Callable[[Path], object]) -> Path:
    """The `model.onnx` of cache folder `entry`: reused when there (its mtime touched: the
    last use, for `mirror-sd cache prune`), else made by `write(tmp)` in a temporary folder
    beside it and renamed into place (`publish`), so a crash never leaves a half entry that
    a later call would trust."""
    entry = Path(entry)
    if (entry / "model.onnx").is_file():
        os.utime(entry)
        return entry / "model.onnx"
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        write(tmp)
        publish(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry / "model.onnx"
