"""The public API in one module: `compile()` a Hugging Face causal LM (+ draft) into a
dual-device `Plan`, `describe()` it, `save()` it and `load()` it back.

Each concern lives in its own module (compiler.py and builders.py, explain.py,
persistence.py); this one
gathers them under the names users and the CLI import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mirror_sd import compiler
from mirror_sd import progress as _progress  # `progress` is compile()'s argument
from mirror_sd.builders import quantization_report
from mirror_sd.compiler import TokenizerMismatchError, default_device_map
from mirror_sd.explain import describe, reference_precision
from mirror_sd.partition import DeviceMap, DeviceMapError, TorchSpec, load_device_map
from mirror_sd.persistence import PLAN_VERSION, load, save
from mirror_sd.runtime.plan import Plan

__all__ = [
    "PLAN_VERSION",
    "DeviceMapError",
    "TokenizerMismatchError",
    "TorchSpec",
    "compile",
    "default_device_map",
    "describe",
    "load",
    "load_device_map",
    "quantization_report",
    "reference_precision",
    "save",
]


def compile(
    target: str | Path,
    draft: str | Path | None = None,
    device_map: str | Path | dict | DeviceMap | None = None,
    *,
    progress: bool | None = None,
    **kwargs: Any,
) -> Plan:
    """`compiler.compile(target, draft, device_map, **kwargs)`: its arguments, result and
    errors are documented there. `progress` True shows progress bars on stderr for its long
    steps (export per layer, quantization, profiling), False hides them, None keeps the
    caller's setting (`mirror_sd.progress`: off, i.e. silent, unless turned on, as the CLI
    does without `--quiet`)."""
    with _progress.shown(_progress.enabled() if progress is None else progress):
        return compiler.compile(target, draft, device_map, **kwargs)
