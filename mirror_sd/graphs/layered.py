"""A target exported once, layer by layer, and any layer range assembled from it without torch.

Why: a split runner needs layers [0, ℓe) and [ℓe, N) as graphs, and compile() picks ℓe only
after measuring. Exporting whole ranges meant a second export (and a second load of the
torch model) whenever the chosen ℓe differed from the provisional one, and every ℓe tried
cost ~6 GB of disk for the 1.5B. Here the exporter sees one layer at a time (its transient
copy is one layer's), and a range is a graph-only splice of the per-layer graphs: seconds,
no torch, no new weight bytes on disk. (What an export process keeps afterwards is another
matter: `export_worker`.)

One cache entry `<type>-layers-<hash>/` holds the parts, each a graph exported by torch's
exporter from the *same* module code as `export._Stages` (so the assembled graph computes
what a whole-range export computes, op for op):

    embed.onnx     input_ids (1, T)                         -> h (1, T, D)
    prep.onnx      position_ids (1, T), mask (G, R, L)      -> cos, sin (1, T, hd),
                                                               bias (G, R, L) additive
    layer_<i>.onnx h, cos, sin, bias, key_index, row_index,  -> h_out, new_k, new_v
                   row_slot, past_k, past_v

with each part's weights in its own `<part>.onnx.data`. `assemble` writes a range graph with
exactly `export.io_names`' interface into the same folder (`range-<first>-<last>[-embed].onnx`),
its initializers pointing at the parts' data files: ONNX Runtime reads external data only from
the model's own folder, and `onnx.load` (which quantization uses) refuses hard-linked data
files, so the ranges live beside the parts and the weight bytes exist once on disk, for every ℓe.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from mirror_sd import progress
from mirror_sd.graphs.export import (
    DEFAULT_OPSET,
    GROUP_INPUTS,
    additive_mask,
    cache_key,
    cached_entry,
    example_groups,
    export_module,
    export_program,
    group_shapes,
    io_names,
)
from mirror_sd.graphs.masks import Grouped
from mirror_sd.graphs.model import CausalLM
from mirror_sd.graphs.onnx_quant import quantize_model

LAYOUT = "layers-v3"  # in every key of this module: bump when the parts' interface changes


class _Embed(nn.Module):
    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model.embed(input_ids)  # (1, T, D)


class _Prep(nn.Module):
    """The per-call tensors every layer shares: rotary cos / sin and the additive mask."""

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model
        self.dtype = model.model.embed_tokens.weight.dtype

    def forward(self, position_ids, mask):
        cos, sin = self.model.rope(position_ids, self.dtype)  # (1, T, hd)
        return cos, sin, additive_mask(mask, self.dtype)


class _Layer(nn.Module):
    def __init__(self, model: CausalLM, i: int):
        super().__init__()
        self.layer = model.model.layers[i]

    def forward(self, h, cos, sin, bias, key_index, row_index, row_slot, past_k, past_v):
        grouped = Grouped(bias, key_index, row_index, row_slot)
        return self.layer(h, cos, sin, grouped, past_k, past_v)


def part_name(i: int) -> str:
    """File stem of layer i's part."""
    return f"layer_{i:03d}"


def _examples(model: CausalLM) -> dict[str, tuple[torch.Tensor, ...]]:
    """Sample inputs with S = 5, T = 3 (no 0 or 1, so the exporter keeps both dynamic)."""
    c, s, t = model.config, 5, 3
    dtype = model.model.embed_tokens.weight.dtype
    h = torch.zeros(1, t, c.hidden_size, dtype=dtype)
    # cos / sin as the model's rope() shapes them: (1, T, hd), or (1, T, R, hd) for R tables
    rot = torch.zeros(model.rope(torch.arange(s, s + t)[None], dtype)[0].shape, dtype=dtype)
    past = torch.zeros(1, s, c.num_kv_heads, c.head_dim, dtype=dtype)
    mask, *index = example_groups(s, t)
    bias = additive_mask(mask, dtype)
    return {
        "embed": (torch.zeros(1, t, dtype=torch.long),),
        "prep": (torch.arange(s, s + t)[None], mask),
        "layer": (h, rot, rot.clone(), bias, *index, past, past.clone()),  # distinct tensors
    }


def _export_parts(model: CausalLM, folder: Path, opset: int) -> None:
    """Every part of `model` into `folder`, a progress bar over the parts (`progress`). The
    exporter runs once per *kind* of layer (`_LayerTemplates`), not once per layer."""
    t, s = torch.export.Dim("T", min=1), torch.export.Dim("S", min=0)
    ex = _examples(model)
    desc = f"exporting {model.config.model_type} per layer"
    with progress.bar(model.num_layers + 2, desc=desc, unit="part") as bar:  # + embed, prep
        export_module(_Embed(model), ex["embed"], folder / "embed.onnx", ["input_ids"], ["h"],
                      {"input_ids": {1: t}}, opset, external_data=True)  # fmt: skip
        bar.update()
        export_module(_Prep(model), ex["prep"], folder / "prep.onnx", ["position_ids", "mask"],
                      ["cos", "sin", "bias"],
                      {"position_ids": {1: t}, "mask": group_shapes(t)["mask"]},
                      opset, external_data=False)  # fmt: skip
        bar.update()
        templates = _LayerTemplates(ex["layer"], t, s, opset)
        for i in range(model.num_layers):
            templates.write(_Layer(model, i), folder / f"{part_name(i)}.onnx")
            bar.update()


class _LayerTemplates:
    """Layer graphs from one export per kind of layer. Exporting costs seconds per call (the
    1.5B's 28 layers took most of a first compile), yet the layers of a model differ only in
    their weights, apart from a few kinds (Gemma 3's sliding and full attention). So the first
    layer of each kind is exported unoptimized (`export_program(optimize=False)`: weights are
    initializers named by parameter), and every layer of that kind is that graph with its own
    weights applied, then optimized and saved exactly as `export_module` would have: the
    same graph, bit for bit the same outputs (tests/graphs/test_layered.py). A layer whose
    parameters are not all named initializers of the template is exported on its own."""

    OUTPUTS = ["h_out", "new_k", "new_v"]

    def __init__(self, example: tuple[torch.Tensor, ...], t, s, opset: int):
        self.example, self.opset = example, opset
        groups = group_shapes(t)
        self.shapes = {"h": {1: t}, "cos": {1: t}, "sin": {1: t}, "bias": groups["mask"],
                       **{n: groups[n] for n in GROUP_INPUTS[1:]},
                       "past_k": {1: s}, "past_v": {1: s}}  # fmt: skip
        self.templates: dict[tuple, Any] = {}  # kind -> (program, unoptimized model) | None

    def write(self, layer: nn.Module, path: Path) -> None:
        weights = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
        kind = layer_kind(layer)
        if kind not in self.templates:
            program = export_program(layer, self.example, list(self.shapes), self.OUTPUTS,
                                     self.shapes, self.opset, optimize=False)  # fmt: skip
            named = set(program.model.graph.initializers)
            self.templates[kind] = (
                (program, program.model.clone()) if set(weights) <= named else None
            )
        if self.templates[kind] is None:  # weights folded into constants: no template
            export_module(layer, self.example, path, list(self.shapes), self.OUTPUTS,
                          self.shapes, self.opset, external_data=True)  # fmt: skip
            return
        program, template = self.templates[kind]
        program.model = template.clone()
        program.apply_weights(weights)
        program.optimize()  # what the exporter's default (optimize=True) runs
        program.save(str(path), external_data=True)


def layer_kind(layer: nn.Module) -> tuple:
    """What decides a layer's graph apart from its weights' values: each submodule's class and
    plain attributes (Gemma 3's window and rope table, head counts, eps) and every weight's
    name, shape and dtype. Layers of one kind share one export (`_LayerTemplates`)."""
    plain = (bool, int, float, str, type(None))
    kind = []
    for name, m in layer.named_modules():
        attrs = sorted((k, v) for k, v in vars(m).items()
                       if not k.startswith("_") and k != "training" and isinstance(v, plain))  # fmt: skip
        kind.append((name, type(m).__qualname__, tuple(attrs)))
    for name, w in [*layer.named_parameters(), *layer.named_buffers()]:
        kind.append((name, tuple(w.shape), str(w.dtype)))
    return tuple(kind)


def _entry(folder: str | Path, model: CausalLM, key_info: Mapping[str, Any], label: str,
           **settings: Any) -> Path:  # fmt: skip
    digest = cache_key(model, key_info, layout=LAYOUT, **settings)[:16]
    return Path(folder) / f"{model.config.model_type}-{label}-{digest}"


def layers_entry(model: CausalLM, folder: str | Path, key_info: Mapping[str, Any],
                 opset: int = DEFAULT_OPSET) -> Path:  # fmt: skip
    """The folder the parts of `model` are (or would be) cached in. `model` may be weightless
    (built on the meta device): only its config and dtype enter the key."""
    return _entry(folder, model, key_info, "layers", opset=opset)


def export_layers_cached(model: CausalLM, folder: str | Path, key_info: Mapping[str, Any],
                         opset: int = DEFAULT_OPSET) -> Path:  # fmt: skip
    """Export the parts of `model` into `layers_entry(...)` unless they are there. The entry is
    written in a temporary folder and renamed into place (a crash leaves nothing a later call
    would trust); reuse touches its mtime (`cache prune`). Returns the entry folder."""
    entry = layers_entry(model, folder, key_info, opset)

    def write(tmp: Path) -> None:
        _export_parts(model, tmp, opset)
        (tmp / "model.onnx").symlink_to("prep.onnx")  # what marks a complete cache entry

    cached_entry(entry, write)
    return entry


def range_name(first: int, last: int, with_embed: bool) -> str:
    """File name of an assembled range inside the parts' folder."""
    return f"range-{first}-{last}{'-embed' if with_embed else ''}.onnx"


def range_entry(model: CausalLM, folder: str | Path, key_info: Mapping[str, Any], first: int,
                last: int, with_embed: bool, quantize: str | None = None,
                opset: int = DEFAULT_OPSET) -> Path:  # fmt: skip
    """The path `range_cached` keeps this range at (`model` may be weightless).

    Raises:
        IndexError: the layer range is empty or outside [0, num_layers].
    """
    if not 0 <= first < last <= model.num_layers:
        raise IndexError(f"layer range [{first}, {last}) empty or outside [0, {model.num_layers}]")
    if not quantize:
        return layers_entry(model, folder, key_info, opset) / range_name(first, last, with_embed)
    label = f"{first}-{last}-{quantize}"
    entry = _entry(folder, model, key_info, label, opset=opset, first=first, last=last,
                   with_embed=with_embed, quantize=quantize)  # fmt: skip
    return entry / "model.onnx"


def range_cached(model: CausalLM, folder: str | Path, key_info: Mapping[str, Any], first: int,
                 last: int, with_embed: bool, quantize: str | None = None,
                 opset: int = DEFAULT_OPSET) -> Path:  # fmt: skip
    """Layers [first, last) (with the embedding when `with_embed`) as one graph with
    `export.io_names`' interface, assembled from the cached parts (exported first if missing)
    and kept beside them, where its external data is: `<layers entry>/range-<first>-<last>
    [-embed].onnx`. With `quantize` ("int8" | "int4") the fp32 range's weights are quantized,
    (`onnx_quant.quantize_weights`, row-invariant as a target needs) into an entry of its own
    `<type>-<first>-<last>-<quantize>-<hash>/model.onnx`.
    Reused when present. Returns the graph's path.

    Raises:
        IndexError: the layer range is empty or outside [0, num_layers].
    """
    path = range_entry(model, folder, key_info, first, last, with_embed, quantize, opset)
    if quantize:  # from the fp32 range, itself cached

        def write(tmp: Path) -> None:
            src = range_cached(model, folder, key_info, first, last, with_embed, opset=opset)
            quantize_model(src, tmp / "model.onnx", quantize)

        return cached_entry(path.parent, write)
    parts = export_layers_cached(model, folder, key_info, opset)  # touched: last use
    if not path.is_file():
        assemble(parts, first, last, with_embed)
    return path


# --- assembly -------------------------------------------------------------------------------
def assemble(parts: str | Path, first: int, last: int, with_embed: bool) -> Path:
    """Splice the parts in folder `parts` into one graph for layers [first, last), written
    beside them (`range_name`; a temporary file renamed into place). Returns its path."""
    parts = Path(parts)
    path = parts / range_name(first, last, with_embed)
    inputs, outputs = io_names(first, last, with_embed, with_head=False)
    x = "input_ids" if with_embed else "hidden"
    # (part stem, {part name: graph name}) in execution order; unmapped names get a prefix
    plan: list[tuple[str, dict[str, str]]] = []
    if with_embed:
        plan.append(("embed", {"input_ids": x, "h": "embed/h"}))
    plan.append(("prep", {n: n for n in ("position_ids", "mask", "cos", "sin", "bias")}))
    h = "embed/h" if with_embed else x
    for i in range(first, last):
        out = "hidden_out" if i == last - 1 else f"{part_name(i)}/h"
        names = {"h": h, "cos": "cos", "sin": "sin", "bias": "bias", "past_k": f"past_k_{i}",
                 "past_v": f"past_v_{i}", "h_out": out, "new_k": f"new_k_{i}",
                 "new_v": f"new_v_{i}", **{n: n for n in GROUP_INPUTS[1:]}}  # fmt: skip
        plan.append((part_name(i), names))
        h = out
    models = [onnx.load(str(parts / f"{stem}.onnx"), load_external_data=False) for stem, _ in plan]
    graph = onnx.GraphProto(name=f"layers_{first}_{last}")
    typed: dict[str, onnx.ValueInfoProto] = {}  # graph-interface name -> its declared type
    functions: dict[tuple[str, str, str], onnx.FunctionProto] = {}
    for (stem, names), m in zip(plan, models, strict=True):
        g = _renamed(m.graph, stem, names)
        graph.node.extend(g.node)
        graph.initializer.extend(g.initializer)
        graph.value_info.extend(g.value_info)
        for v in [*g.input, *g.output]:
            typed.setdefault(v.name, v)
        for f in m.functions:
            functions.setdefault((f.domain, f.name, f.overload), f)
    graph.input.extend(typed[n] for n in inputs)
    graph.output.extend(typed[n] for n in outputs)
    model = onnx.helper.make_model(
        graph, opset_imports=models[0].opset_import, functions=list(functions.values())
    )
    model.ir_version = models[0].ir_version
    model.producer_name = "mirror-sd layered assembly"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=parts)
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _renamed(g: onnx.GraphProto, prefix: str, names: Mapping[str, str]) -> onnx.GraphProto:
    """A copy of part graph `g` with interface names mapped by `names` and every other value,
    node and initializer name prefixed with `prefix/` (so parts never collide), inside its
    subgraphs (an If's branches, which read outer values by name) too."""
    g = onnx.GraphProto.FromString(g.SerializeToString())

    def new(n: str) -> str:
        return n if not n else names.get(n, f"{prefix}/{n}")

    def rename(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            node.name = f"{prefix}/{node.name}"
            node.input[:] = [new(n) for n in node.input]
            node.output[:] = [new(n) for n in node.output]
            for a in node.attribute:
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                    rename(sub)
        for v in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
            v.name = new(v.name)

    rename(g)
    return g
