"""The torch family (`backend: torch`, `TorchSpec`): a model run in this process by torch on
cpu / cuda:N / mps, optionally with weight-only int8 / int4 linears (`graphs.quantize`).

Torch devices run any node range: a model spread over devices (`pipelined.py`) and a
tensor-parallel target (`distributed/`) are built from `torch_spec`. The sim family
(`backends/sim.py`) reuses these runners on the host CPU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror_sd.backends.base import Backend
from mirror_sd.backends.facts import TorchFacts
from mirror_sd.devices.shared_sessions import shared_model
from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.devices.trimmed import TrimmedVocabRunner
from mirror_sd.graphs.loader import load_model
from mirror_sd.graphs.quantize import quantize_linears
from mirror_sd.graphs.streams import StreamTable, with_streams
from mirror_sd.graphs.trimmed_head import with_trimmed_head
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.partition.device_map import DeviceSpec, TorchSpec
from mirror_sd.partition.precision import (
    AUTO,
    CpuCaps,
    choose_dtype,
    choose_torch_quantize,
    dtype_for_quantized,
)

if TYPE_CHECKING:
    from mirror_sd.partition.threads import ThreadBudget


def _with_quantize(model, quantize: str):
    """`model` with weight-only int8 / int4 linears (`graphs.quantize`) unless `quantize` is
    "none"; the swap happens in place and the model is returned."""
    if quantize != "none":
        quantize_linears(model, quantize)
    return model


class TorchBackend(TorchFacts, Backend):
    """Torch devices: the model's own weights, loaded at the entry's dtype. `torch_spec` and
    `label` are the hooks the sim family overrides."""

    def resolve_precision(
        self, spec: TorchSpec, checkpoint: str, caps: CpuCaps, role: str = "target"
    ) -> tuple[TorchSpec, str | None]:
        if AUTO not in (spec.dtype, spec.quantize):
            return spec, None
        cpu = caps if spec.device == "cpu" else None  # the host CPU's flags say nothing of a GPU
        said = []
        if spec.quantize == AUTO:
            choice = choose_torch_quantize(checkpoint, spec.device, cpu)
            spec = dataclasses.replace(spec, quantize=choice.value)
            said.append(choice.describe())
        if spec.dtype == AUTO:
            choice = (
                dtype_for_quantized(spec.quantize, cpu)
                if spec.quantize != "none"
                else choose_dtype(checkpoint, spec.device, cpu)
            )
            spec = dataclasses.replace(spec, dtype=choice.value)
            said.append(choice.describe())
        return spec, "; ".join(said)

    def torch_spec(self, spec: TorchSpec) -> TorchSpec:
        return spec

    def label(self, spec: DeviceSpec, dev: TorchDevice) -> str:
        """How describe() and results name the device its model runs on."""
        q = self.torch_spec(spec).quantize
        return dev.describe() + (f" {q} weights" if q != "none" else "")

    def device(self, spec: DeviceSpec, threads: int | None = None) -> TorchDevice:
        """The `TorchDevice` of the entry; `threads` is the thread budget's count when alone
        (None: the map's `threads`)."""
        host = self.torch_spec(spec)
        return TorchDevice(host.device, threads or host.threads, host.dtype)

    def target_runner(self, spec: DeviceSpec, folder: Path, exit_layer: int, max_len: int,
                      onnx_root: Path, budget: ThreadBudget | None = None,
                      lens_ids: list[int] | None = None, keep_model: bool = True
                      ) -> tuple[Any, Any, str, None]:  # fmt: skip
        """The target's torch model on the device (checked first); no logit lens."""
        dev = self.device(spec, budget.target() if budget else None)
        dev.check()
        model = _with_quantize(load_model(folder, dev.dtype), self.torch_spec(spec).quantize)
        runner = TorchRunner(model, dev, max_len, exit_layer=exit_layer)
        return model, runner, self.label(spec, dev), None

    def draft_runner(self, spec: DeviceSpec, folder: Path, max_len: int, onnx_dir: Path,
                     trim: VocabTrim | None = None, budget: ThreadBudget | None = None,
                     onnx: Path | None = None, streams: StreamTable | None = None
                     ) -> tuple[Any, str, None]:  # fmt: skip
        """The draft's torch model; with a `trim`, its head keeps the trim's K rows and
        `TrimmedVocabRunner` restores (T, V) logits, -inf outside the kept set; with
        `streams`, its embedding also reads the stream rows (`graphs.streams`)."""
        host = self.torch_spec(spec)
        dev = self.device(spec, budget.draft() if budget else None)
        model = shared_model(  # one model for several plans in one server (`shared_sessions`)
            folder,
            repr((dev.device, host.dtype, host.quantize)),
            lambda: _with_quantize(load_model(folder, host.dtype), host.quantize),
        )
        if streams is not None:
            model = with_streams(model, streams)
        label = self.label(spec, dev)
        if trim is None:
            return TorchRunner(model, dev, max_len, name="draft"), label, None
        runner = TorchRunner(with_trimmed_head(model, trim), dev, max_len, name="draft")
        return TrimmedVocabRunner(runner, trim), label, None
