"""compile()'s placement by node executed: a model whose nodes the map spreads over devices.

When a placement puts `target.*` (or `draft.*`) nodes on more than one device, the model runs
as a `PipelineRunner` (devices/pipeline_runner.py): its layer ranges on their devices, the
hidden state crossing each cut, the exit head where `target.exit_head` is placed. Every device
of such a model must be a torch (or sim, run on the host) device with one dtype; an
onnxruntime device runs whole models (placement.check_capabilities says so first).
"""

from __future__ import annotations

from pathlib import Path

from mirror_sd.backends.registry import backend_for
from mirror_sd.devices.pipeline_runner import PipelineRunner
from mirror_sd.devices.torch_device import TorchDevice
from mirror_sd.graphs.loader import load_model
from mirror_sd.graphs.model import CausalLM
from mirror_sd.partition import DeviceMap, DeviceMapError
from mirror_sd.partition.placement import Placement
from mirror_sd.partition.stages import exit_alias, model_aliases, model_stages


def spans_devices(placement: Placement, model: str) -> bool:
    """True when `model`'s nodes (its exit head included) run on more than one device."""
    aliases = set(model_aliases(placement.assignment, model))
    head = exit_alias(placement.assignment, model)
    return len(aliases | ({head} if head else set())) > 1


def first_alias(placement: Placement, model: str) -> str:
    """The device running `model`'s embedding: the one named for the model as a whole (its
    thread budget, its DeviceSlot)."""
    return placement.assignment[f"{model}.embed"]


def pipeline_runner(dm: DeviceMap, placement: Placement, model: str, folder: Path, max_len: int,
                    exit_layer: int = 0, threads: int | None = None
                    ) -> tuple[CausalLM, PipelineRunner, str]:  # fmt: skip
    """(torch model, runner, label) for `model` ("target" / "draft") spread over devices.

    `threads`: the thread budget's count for the model's pipeline (None: each device's own).
    Raises:
        DeviceMapError: a device of the model is not torch / sim, or the dtypes differ.
    """
    aliases = model_aliases(placement.assignment, model)
    head = exit_alias(placement.assignment, model)
    devices: dict[str, TorchDevice] = {}
    for alias in aliases + ([head] if head and head not in aliases else []):
        given = dm.devices[alias]
        spec = backend_for(given).torch_spec(given)  # a sim device: its host torch device
        if spec is None:
            raise DeviceMapError(
                f"devices.{alias}",
                f"runs part of the {model} ({given.backend}); a model spread over devices runs "
                "on torch or sim devices only: place the whole model on this device or make "
                "every device it uses `backend: torch`",
                dm.source,
            )
        if spec.tensor_parallel > 1:
            raise DeviceMapError(
                f"devices.{alias}.tensor_parallel",
                f"a {model} spread over devices runs each stage on one process: set "
                "tensor_parallel: 1 here, or place the whole model on this device",
                dm.source,
            )
        devices[alias] = TorchDevice(spec.device, threads or spec.threads, spec.dtype)
    dtypes = {d.dtype for d in devices.values()}
    if len(dtypes) > 1:
        raise DeviceMapError(
            "devices",
            f"the {model} is spread over {', '.join(devices)} with dtypes {sorted(dtypes)}; "
            "give every device running one model the same `dtype:`",
            dm.source,
        )
    m = load_model(folder, dtypes.pop())
    stages = model_stages(placement.assignment, model, m.num_layers)
    runner = PipelineRunner(m, stages, devices, max_len, exit_layer, head, name=model)
    runner.set_threads(threads)
    label = "pipeline " + " | ".join(
        f"{s.describe()} ({devices[s.alias].describe()})" for s in stages
    )
    if head:
        label += f"; exit head on {head}"
    return m, runner, label
