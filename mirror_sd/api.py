"""The public API in one module: `compile()` a Hugging Face causal LM (+ draft) into a
dual-device `Plan`, `describe()` it, `save()` it and `load()` it back.

Each concern lives in its own module (compiler.py and builders.py, explain.py,
persistence.py); this one
gathers them under the names users and the CLI import.
"""

from mirror_sd.builders import quantization_report
from mirror_sd.compiler import TokenizerMismatchError, compile, default_device_map
from mirror_sd.explain import describe, reference_precision
from mirror_sd.partition import DeviceMapError, TorchSpec, load_device_map
from mirror_sd.persistence import PLAN_VERSION, load, save

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
