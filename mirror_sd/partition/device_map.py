"""YAML device maps (schema version 1) as types: which devices exist and which graph nodes
go where.

    version: 1
    devices:     alias -> {backend: torch | onnxruntime | sim, ...backend options}
    placement:   node name or dotted prefix -> alias   (longest prefix wins; see placement.py)
    speculation: SpecConfig fields                      (defaults live only in SpecConfig)

A map is loaded (`device_map_load.load_device_map`) into the frozen dataclasses here:

    DeviceMap      devices (alias -> DeviceSpec), placement (node or prefix -> alias), SpecConfig
    DeviceSpec     TorchSpec | OrtSpec | SimSpec: one `devices:` entry with every option
    DeviceMapError a malformed map, naming the offending key path (`devices.npu.providers[0]`)

Whether a provider is *available* on this machine is the devices layer's question; the
partition layer never imports onnxruntime or any device API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import yaml

from mirror_sd.partition.spec_config import SpecConfig

SCHEMA_VERSION = 1
TOP_LEVEL_KEYS = ("version", "devices", "placement", "speculation")
BACKENDS = ("torch", "onnxruntime", "sim")
TORCH_DTYPES = ("float32", "float16", "bfloat16", "auto")  # auto: partition/precision.py
ORT_PROVIDERS = (
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "OpenVINOExecutionProvider",
    "QNNExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
)
ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")
ORT_QUANTIZE = (
    "none",
    "int8",
    "int4",
    "int8-rows",
    "int7-rows",
    "auto",
)  # auto: partition/precision.py (torch too)


class DeviceMapError(ValueError):
    """A malformed device map: `path` is the offending key path, `source` the file (or '<text>')."""

    def __init__(self, path: str, message: str, source: str = "<dict>"):
        self.path, self.message, self.source = path, message, source
        where = "" if source.startswith("<") else f" {source}"
        at = f"{path}: " if path else ""
        super().__init__(f"device map{where}: {at}{message}")


@dataclass(frozen=True)
class DeviceSpec:
    """One device of the map; `alias` is its name in `devices:`. Subclasses add options.

    `physical` names the hardware whose cores and memory the device computes on; devices with
    the same name share it (the thread budget, partition/threads.py). None derives it: "cpu"
    for the host CPU (torch cpu, ORT's CPU provider, OpenVINO on CPU), "cuda:N", else the alias.
    """

    backend: ClassVar[str] = ""
    alias: str

    def to_dict(self) -> dict[str, Any]:
        """Every option, defaults included, as the YAML mapping under `devices.<alias>`."""
        return {"backend": self.backend, **{k: v for k, v in asdict(self).items() if k != "alias"}}


@dataclass(frozen=True)
class TorchSpec(DeviceSpec):
    """A torch device: `device` is cpu | cuda | cuda:N | mps; `threads` sets torch's CPU threads."""

    backend: ClassVar[str] = "torch"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # None: the thread budget decides (all cores when alone)
    physical: str | None = None
    tensor_parallel: int = 1  # ranks of a Megatron-style TP model (mirror_sd/distributed)
    tp_timeout_s: float = 60.0  # a collective slower than this ends generation (dead rank)
    quantize: str = "none"  # int8 | int4: weight-only linears on torch's CPU kernels (auto)


@dataclass(frozen=True)
class OrtSpec(DeviceSpec):
    """An ONNX Runtime session: execution providers in priority order, as ORT takes them.

    `allow_fallback=False` asks the devices layer to fail when a listed provider is not
    available instead of silently running on the next one; `quantize="int8"` / `"int4"` exports
    the model on this device with 8- / 4-bit weights: a draft's acceptance rate changes, never
    the output; a quantized target is the plan's reference (lossless = identical to that
    quantized target's own greedy decoding). `intra_op_threads` None lets the thread budget
    decide (every core of the physical device whenever the other pipeline is idle).
    """

    backend: ClassVar[str] = "onnxruntime"
    providers: tuple[tuple[str, dict[str, Any]], ...] = (("CPUExecutionProvider", {}),)
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    optimization_level: str = "all"
    allow_fallback: bool = False
    quantize: str = "none"
    physical: str | None = None
    # a draft's prompt prefill on a second graph of the same model at this weight format
    # (`OrtRunner` fill_graph): "none" = the draft's own graph; "auto" = `precision.
    # choose_prefill_quantize`. The two share one KV cache; only acceptance can change.
    prefill_quantize: str = "none"

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["providers"] = [{name: dict(opts)} for name, opts in self.providers]
        return d


@dataclass(frozen=True)
class SimSpec(DeviceSpec):
    """Simulated hardware: no compute, timings from a cost `profile` JSON file (partition.profile.Profile).

    A relative `profile` path is relative to the device map file's folder (`DeviceMap.resolve`).
    """

    backend: ClassVar[str] = "sim"
    profile: str


SPEC_CLASSES: dict[str, type[DeviceSpec]] = {c.backend: c for c in (TorchSpec, OrtSpec, SimSpec)}


@dataclass(frozen=True)
class DeviceMap:
    """A validated device map. Treat the mappings as read-only; `source` is not compared."""

    devices: Mapping[str, DeviceSpec]
    placement: Mapping[str, str]
    speculation: SpecConfig = field(default_factory=SpecConfig)
    source: str = field(default="<dict>", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The fully expanded map (every default written out); `load_device_map` reads it back equal."""
        return {
            "version": SCHEMA_VERSION,
            "devices": {alias: spec.to_dict() for alias, spec in self.devices.items()},
            "placement": dict(self.placement),
            "speculation": asdict(self.speculation),
        }

    def to_yaml(self) -> str:
        """`to_dict()` as YAML text, keys in schema order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def with_speculation(self, speculation: SpecConfig) -> DeviceMap:
        """This map with `speculation` in place of its own (e.g. the plan's chosen settings)."""
        return replace(self, speculation=speculation)

    def without_draft(self) -> DeviceMap:
        """This map without its `draft` / `draft.*` placement keys and the devices only they
        use (a plan compiled with no draft)."""
        placement = {k: a for k, a in self.placement.items() if k.split(".")[0] != "draft"}
        used = set(placement.values())
        dropped = {a for k, a in self.placement.items() if k.split(".")[0] == "draft"} - used
        devices = {a: d for a, d in self.devices.items() if a not in dropped}
        return replace(self, devices=devices, placement=placement)

    def dump(self, path: str | Path) -> None:
        """Write `to_yaml()` to `path`."""
        Path(path).write_text(self.to_yaml())

    def resolve(self, relative: str) -> Path:
        """A path from the map (e.g. a sim profile) resolved against the map file's folder."""
        p = Path(relative).expanduser()
        if p.is_absolute() or self.source.startswith("<"):
            return p
        return Path(self.source).parent / p
