"""The host CPU's model name and instruction-set flags, read once from /proc/cpuinfo.

Kernels are chosen by what the CPU offers (`partition.precision`) and every benchmark result
records it. Elsewhere than Linux the flags are empty and the model is `platform.processor()`,
so `auto` choices fall back to fp32.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

from mirror_sd.partition.precision import CpuCaps

CPUINFO = Path("/proc/cpuinfo")


@functools.cache
def host_caps() -> CpuCaps:
    """This machine's CpuCaps (first processor entry of /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return CpuCaps(model, flags)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in (platform.processor(), platform.machine()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / Arm
            flags = frozenset(value.split())
    return CpuCaps(model, flags)
