"""mirror-sd: a heterogeneous-device runtime for lossless Mirror speculative decoding.

import mirror_sd
plan = mirror_sd.compile("qwen2.5-coder-1.5b", draft="qwen2.5-coder-0.5b",
                         device_map="examples/device_maps/ort_ort_cpu.yaml")
print(mirror_sd.describe(plan))
print(plan.generate("Write a haiku about caches.", max_new_tokens=64).text)
"""

# Imported lazily (PEP 562) so that `import mirror_sd.partition` stays free of onnxruntime
# and torch-heavy modules: the pure layers must be importable on their own.
_EXPORTS = {
    "compile": "mirror_sd.api",
    "describe": "mirror_sd.api",
    "load": "mirror_sd.api",
    "save": "mirror_sd.api",
    "TokenizerMismatchError": "mirror_sd.api",
    "DeviceMap": "mirror_sd.partition",
    "DeviceMapError": "mirror_sd.partition",
    "SpecConfig": "mirror_sd.partition",
    "load_device_map": "mirror_sd.partition",
    "Plan": "mirror_sd.runtime.plan",
    "PlanBusyError": "mirror_sd.runtime.plan",
    "GenerationResult": "mirror_sd.runtime.results",
    "GenerationStats": "mirror_sd.runtime.results",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mirror_sd' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [  # noqa: F822 (provided by __getattr__)
    "DeviceMap",
    "DeviceMapError",
    "GenerationResult",
    "GenerationStats",
    "Plan",
    "PlanBusyError",
    "SpecConfig",
    "TokenizerMismatchError",
    "compile",
    "describe",
    "load",
    "load_device_map",
    "save",
]
