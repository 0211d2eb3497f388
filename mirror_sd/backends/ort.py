"""The onnxruntime family (`backend: onnxruntime`, `OrtSpec`): a session on ordered execution
providers running whole exported models (the draft as one graph, the target as prefix, exit
head and suffix at ℓe), exported and cached before they run. Its execution-provider facts
(which compute on the host CPU, which take device memory) are `facts.OrtFacts`.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror_sd import export_worker
from mirror_sd.backends.base import Backend
from mirror_sd.backends.facts import OrtFacts
from mirror_sd.devices.cpu_caps import host_caps
from mirror_sd.devices.ort_core import OrtDevice
from mirror_sd.devices.ort_device import OrtRunner
from mirror_sd.devices.ort_split import (
    OrtSplitRunner,
    SplitGraphs,
    export_split,
    split_needs_weights,
)
from mirror_sd.devices.trimmed import TrimmedVocabRunner
from mirror_sd.export_worker import cached_lens, measure_lens
from mirror_sd.graphs.export import find_cached, source_identity
from mirror_sd.graphs.loader import load_model, release_memory, weightless_model
from mirror_sd.graphs.streams import StreamTable, add_streams_onnx
from mirror_sd.graphs.trimmed_head import export_trimmed
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.partition.device_map import DeviceMapError, OrtSpec
from mirror_sd.partition.precision import (
    AUTO,
    CpuCaps,
    choose_prefill_quantize,
    choose_quantize,
    rows_gemm_warning,
)

if TYPE_CHECKING:
    from mirror_sd.partition.threads import ThreadBudget


def _quant(spec: OrtSpec) -> str | None:
    """The export's weight quantization (None: fp32)."""
    return None if spec.quantize == "none" else spec.quantize


class OrtBackend(OrtFacts, Backend):
    """ONNX Runtime devices: whole models, exported (and cached) before they run. `device()`
    is the entry's `OrtDevice` (what `check` and the runners open sessions on)."""

    def resolve_precision(
        self, spec: OrtSpec, checkpoint: str, caps: CpuCaps, role: str = "target"
    ) -> tuple[OrtSpec, str | None]:
        if spec.quantize != AUTO:
            return spec, None
        choice = choose_quantize(checkpoint, caps, role)
        return dataclasses.replace(spec, quantize=choice.value), choice.describe()

    def device(
        self, spec: OrtSpec, budget: ThreadBudget | None = None, role: str = "target"
    ) -> OrtDevice:
        """The entry's `OrtDevice`, its providers checked, its sessions sized by the thread
        budget (the count a pipeline gets when it runs alone). When target and draft share the
        cores, pool threads spin only while a run lasts (`OrtDevice.spin_stop`), never into
        the other's turn.

        Raises:
            ProviderUnavailableError: a listed provider is missing and fallback is off.
        """
        threads = spec.intra_op_threads
        if budget is not None:
            threads = budget.target() if role == "target" else budget.draft()
        dev = OrtDevice(spec.providers, threads, spec.inter_op_threads, spec.optimization_level,
                        spec.allow_fallback, spin_stop=bool(budget and budget.shared))  # fmt: skip
        dev.check()
        return dev

    def check(self, spec: OrtSpec, budget: ThreadBudget | None, role: str) -> None:
        if role == "target" and spec.prefill_quantize not in ("none", AUTO):
            raise DeviceMapError(f"devices.{spec.alias}.prefill_quantize", "a second prefill "
                                 "graph is for a draft's device; a target prefills through its "
                                 "own split graphs: remove the key")  # fmt: skip
        self.device(spec, budget, role)  # a missing execution provider fails here
        if spec.providers[0][0] == "CPUExecutionProvider":
            for key, value in (("quantize", spec.quantize),
                               ("prefill_quantize", self.prefill_quantize(spec))):  # fmt: skip
                if value == "int8-rows" and (
                    why := rows_gemm_warning(f"devices.{spec.alias}.{key}", host_caps())
                ):
                    warnings.warn(why, RuntimeWarning, stacklevel=2)

    def draft_export(self, spec: OrtSpec, folder: Path, onnx_dir: Path) -> Path:
        """The draft's exported (and quantized) ONNX file: from the cache, else exported (in a
        worker process for a large model, `export_worker`), before the target loads."""
        quant = _quant(spec)
        cached = find_cached(weightless_model(folder), onnx_dir, source_identity(folder), quant)
        if cached is not None:
            return cached
        out = export_worker.run("draft", folder, onnx_dir=str(onnx_dir), quantize=quant)
        return Path(out["path"])

    @staticmethod
    def prefill_quantize(spec: OrtSpec) -> str:
        """The draft's prefill weight format (`prefill_quantize`, `auto` resolved here)."""
        if spec.prefill_quantize != AUTO:
            return spec.prefill_quantize
        if spec.providers[0][0] != "CPUExecutionProvider":
            return "none"  # the rule is measured on CPU kernels only
        return choose_prefill_quantize(spec.quantize, host_caps()).value

    def target_runner(self, spec: OrtSpec, folder: Path, exit_layer: int, max_len: int,
                      onnx_root: Path, budget: ThreadBudget | None = None,
                      lens_ids: list[int] | None = None, keep_model: bool = True
                      ) -> tuple[Any, Any, str, dict | None]:  # fmt: skip
        """The target's graphs spliced from its per-layer export (`graphs.layered`); without
        `keep_model` a missing export or lens is made by `export_worker` and no torch model is
        loaded here."""
        quant = _quant(spec)
        key, meta = source_identity(folder), weightless_model(folder)
        model = lens = None
        if keep_model:  # exit heads / vocabulary trims are built from it: it stays loaded
            model = load_model(folder, "float32")
            graphs = export_split(model, onnx_root, key, exit_layer, quant)
            lens = measure_lens(model, onnx_root, key, lens_ids) if lens_ids else None
        else:
            lens = cached_lens(meta, onnx_root, key, lens_ids) if lens_ids else None
            if (lens_ids and lens is None) or split_needs_weights(
                meta, onnx_root, key, exit_layer, quant
            ):  # export and measure in a worker process: its memory leaves with it
                out = export_worker.run("target", folder, onnx_dir=str(onnx_root),
                                        exit_layer=exit_layer, quantize=quant,
                                        lens_ids=None if lens else lens_ids)  # fmt: skip
                graphs = SplitGraphs(*(Path(p) for p in out["graphs"]))
                lens = lens or out["lens"]
            else:  # every graph cached, or spliced from the cached per-layer export
                graphs = export_split(meta, onnx_root, key, exit_layer, quant)
        n_layers, width = meta.num_layers, meta.config.hidden_size
        release_memory()  # freed heap back to the OS before the sessions load
        runner = OrtSplitRunner.from_graphs(
            graphs, n_layers, width, exit_layer, max_len, self.device(spec, budget, "target"),
            alias=spec.alias, quantize=quant,
        )  # fmt: skip
        precision = f" {spec.quantize} weights" if spec.quantize != "none" else ""
        return model, runner, f"onnxruntime {runner.prefix.get_providers()[0]}{precision}", lens

    def draft_runner(self, spec: OrtSpec, folder: Path, max_len: int, onnx_dir: Path,
                     trim: VocabTrim | None = None, budget: ThreadBudget | None = None,
                     onnx: Path | None = None, streams: StreamTable | None = None
                     ) -> tuple[Any, str, Path]:  # fmt: skip
        """The exported draft (`onnx` when `draft_export` made it already); with a `trim`, its
        head keeps the trim's K rows (exported under its own cache key); with `streams`, a
        copy of the graph whose embedding also reads the stream rows runs (`graphs.streams`;
        the path returned is the plain graph's)."""
        dev = self.device(spec, budget, "draft")
        if trim is None:
            path = onnx or self.draft_export(spec, folder, onnx_dir)
        else:
            model = load_model(folder, "float32")
            path = export_trimmed(model, onnx_dir, source_identity(folder), trim, _quant(spec))
            del model
        graph = add_streams_onnx(path, streams) if streams is not None else path
        prefill = self.prefill_quantize(spec)
        fill_graph = None
        if prefill not in ("none", spec.quantize):
            fill_graph = self.draft_export(dataclasses.replace(spec, quantize=prefill), folder,
                                           onnx_dir)  # fmt: skip
        runner = OrtRunner(graph, dev, max_len, name="draft", alias=spec.alias,
                           fill_graph=fill_graph)  # fmt: skip
        label = f"onnxruntime {runner.session.get_providers()[0]}"
        if fill_graph is not None:
            label += f", prompts prefilled with {prefill} weights"
        return (TrimmedVocabRunner(runner, trim) if trim else runner), label, path
