"""What each backend family of the device map is, as the partitioner asks it: pure facts about
a map entry (`Capabilities`), with no device API. The partitioner (`partition/threads.py`,
`partition/placement.py`) imports this module and nothing else of `backends/`; the families'
`Backend` objects (`registry.py`) are these facts plus what builds runners.

    HOST_CPU          the physical device name of this machine's CPU cores
    Capabilities      physical device, memory kind, pinned threads, whole models only
    provider_physical which execution providers compute on the host CPU (the one home of
                      that rule), PROVIDER_MEMORY which take device memory
    Facts             one family's answers; OrtFacts, TorchFacts, SimFacts
    capabilities()    an entry's Capabilities, from the family that owns its spec type
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from mirror_sd.partition.device_map import DeviceSpec, OrtSpec, SimSpec, TorchSpec

HOST_CPU = "cpu"  # the physical device name of this machine's CPU cores
HOST_MEMORY = "cpu"  # the memory kind of host RAM (an OrtValue's device type)
# Execution providers whose inputs and outputs live in device memory, and that memory's
# OrtValue name. The others (CPU, OpenVINO, QNN, CoreML) take host memory and copy themselves.
PROVIDER_MEMORY = {
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
}

T = TypeVar("T")


@dataclass(frozen=True)
class Capabilities:
    """What one map entry is, as the partitioner and compile() ask it.

    `physical`: the hardware whose cores and memory it computes on; entries with the same
    name share it (the thread budget). `memory`: where its inputs and outputs live, HOST_MEMORY
    or a device memory ("cuda", "mps", "dml"). `threads`: the intra-op thread count the map
    pins (None: the thread budget decides). `whole_models`: it runs whole models only (one
    exported graph per model, schema v1), never a node range of one.
    """

    physical: str
    memory: str
    threads: int | None
    whole_models: bool

    @property
    def on_host_cpu(self) -> bool:
        """True when it computes on this machine's CPU cores."""
        return self.physical == HOST_CPU

    def solo_threads(self, cores: int) -> int | None:
        """The threads it gets when its pipeline runs alone: the pinned count, every core of
        the host CPU, else None (the runtime's default; irrelevant for an accelerator)."""
        return self.threads or (cores if self.on_host_cpu else None)


def provider_physical(name: str, options: Mapping[str, Any]) -> str | None:
    """The physical device an execution provider computes on: HOST_CPU for the CPU provider
    and OpenVINO with device_type CPU (the default), "openvino:<kind>" for OpenVINO's other
    devices, "cuda:N" for CUDA / TensorRT; None for a provider on its own hardware (an NPU)."""
    if name == "CPUExecutionProvider":
        return HOST_CPU
    if name == "OpenVINOExecutionProvider":
        kind = str(options.get("device_type", "CPU")).upper()
        return HOST_CPU if kind.startswith("CPU") else f"openvino:{kind.lower()}"
    if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return f"cuda:{options.get('device_id', 0)}"
    return None


class Facts(ABC):
    """One backend family's facts: the spec type it owns and each entry's `Capabilities`."""

    spec_type: ClassVar[type[DeviceSpec]]

    @property
    def name(self) -> str:
        """The map's `backend:` value."""
        return self.spec_type.backend

    @abstractmethod
    def capabilities(self, spec: Any) -> Capabilities:
        """The entry's `Capabilities` (pure)."""


class OrtFacts(Facts):
    """onnxruntime: the first execution provider decides; whole exported models only."""

    spec_type = OrtSpec

    def capabilities(self, spec: OrtSpec) -> Capabilities:
        name, options = spec.providers[0]
        return Capabilities(
            physical=str(spec.physical or provider_physical(name, options) or spec.alias),
            memory=PROVIDER_MEMORY.get(name, HOST_MEMORY),
            threads=spec.intra_op_threads,
            whole_models=True,
        )


class TorchFacts(Facts):
    """torch: cpu is the host CPU, cuda:N / mps their own device and memory; any node range."""

    spec_type = TorchSpec

    def capabilities(self, spec: TorchSpec) -> Capabilities:
        own = HOST_CPU if spec.device == "cpu" else spec.device
        return Capabilities(
            physical=str(spec.physical or own),
            memory=spec.device.split(":")[0],  # cpu | cuda | mps
            threads=spec.threads,
            whole_models=False,
        )


class SimFacts(Facts):
    """sim: its own (simulated) hardware, never sharing cores with another entry; its model
    runs in host memory here."""

    spec_type = SimSpec

    def capabilities(self, spec: SimSpec) -> Capabilities:
        return Capabilities(physical=spec.alias, memory=HOST_MEMORY, threads=None,
                            whole_models=False)  # fmt: skip


FACTS: dict[type[DeviceSpec], Facts] = {
    f.spec_type: f for f in (OrtFacts(), TorchFacts(), SimFacts())
}


def owner(table: Mapping[type, T], spec: object) -> T:
    """The entry of `table` (spec type -> family) that owns `spec`; a subclass of a
    registered spec type counts as it.

    Raises:
        TypeError: no family owns the spec's type; the message names the registered ones.
    """
    for cls in type(spec).__mro__:
        if cls in table:
            return table[cls]
    known = ", ".join(f"{t.__name__} ({getattr(t, 'backend', '?')})" for t in table)
    raise TypeError(
        f"no backend runs {type(spec).__name__} {spec!r}; registered: {known}. A new family "
        "is a module in mirror_sd/backends/ with its rows in facts.FACTS and registry.BACKENDS"
    )


def capabilities(spec: object) -> Capabilities:
    """The `Capabilities` of a map entry, from the family that owns its spec type.

    Raises:
        TypeError: no family owns the spec's type.
    """
    return owner(FACTS, spec).capabilities(spec)
