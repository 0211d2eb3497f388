"""The compute budget: how many threads each pipeline runs on, phase by phase.

Two devices of a map may be one physical device: two ONNX Runtime "devices" on the CPU
provider are the same cores and the same memory bus. LLM decoding is bandwidth-bound, and on
small VMs one core reaches about half the bandwidth of two, so a pipeline that runs alone
(prefill, autoregressive decoding, speculative decoding's draft chain and its verification)
must use every core of its physical device. Only mirror's overlapped phase (target suffix ||
branch rollouts) has both pipelines busy at once; there the budget follows `overlap`:

    share   both pipelines keep every core and the OS shares them (pool threads spin only
            inside their own run); when one side finishes first, the other has the whole
            device again at once (work-conserving). The default: measured on the 2-core
            EPYC it is as fast as a fixed split while both run and faster after.
    split   the target gets `target_cores`, the draft the rest (a fixed partition, as a
            device map that pins cores asks for).

Devices on different physical devices never share: each runs on its own cores all the time.
A device map's explicit `intra_op_threads` / `threads` is honoured as written (no budget).

This module is pure: specs in, thread counts out; `devices/` applies them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mirror_sd.backends import facts  # light: capability facts, no device API
from mirror_sd.partition.device_map import DeviceSpec

OVERLAP_POLICIES = ("share", "split")


def physical_device(spec: DeviceSpec) -> str:
    """The physical device whose cores and memory a device of the map computes on.

    The map's `physical:` key when given; else "cpu" for the host CPU (a torch cpu device, an
    ONNX Runtime device whose first provider computes on the CPU: CPUExecutionProvider,
    OpenVINO with device_type CPU); "cuda:N" for CUDA / TensorRT; the alias itself for anything
    else (an NPU, a simulated device): its own hardware. Each backend family answers it
    (`Capabilities.physical`).
    """
    return facts.capabilities(spec).physical


@dataclass(frozen=True)
class ThreadBudget:
    """Threads per pipeline and phase. None means "the runtime's default" (every core of a
    CPU; irrelevant for an accelerator), an int is an intra-op thread count."""

    target_solo: int | None
    draft_solo: int | None
    target_overlap: int | None
    draft_overlap: int | None
    shared: bool  # target and draft compute on one physical device
    physical: tuple[str, str | None]  # (target's, draft's) physical device
    cores: int  # cores of the host CPU

    @classmethod
    def for_devices(
        cls,
        target: DeviceSpec,
        draft: DeviceSpec | None,
        overlap: str = "share",
        target_cores: int | None = None,
        cores: int | None = None,
    ) -> ThreadBudget:
        """The budget for a target (and draft) device of a map.

        `overlap` is "share" or "split" (module doc); `target_cores` the target's share
        of a split (default: half, rounded up); `cores` the host's cores (default: all).

        Raises:
            ValueError: an unknown `overlap` policy or a split that leaves a side no core.
        """
        if overlap not in OVERLAP_POLICIES:
            raise ValueError(f"overlap {overlap!r}: expected one of {', '.join(OVERLAP_POLICIES)}")
        cores = cores or os.cpu_count() or 1
        t_caps = facts.capabilities(target)
        d_caps = facts.capabilities(draft) if draft is not None else None
        t_phys, d_phys = t_caps.physical, d_caps.physical if d_caps else None
        shared = d_phys == t_phys
        t_fixed, d_fixed = t_caps.threads, d_caps.threads if d_caps else None
        t_solo = t_caps.solo_threads(cores)
        d_solo = d_caps.solo_threads(cores) if d_caps else None
        t_over, d_over = t_solo, d_solo
        if shared and t_caps.on_host_cpu and overlap == "split":
            t_share = target_cores or (cores + 1) // 2
            if not 1 <= t_share < cores:
                raise ValueError(
                    f"a split of {cores} cores needs target_cores in [1, {cores - 1}], "
                    f"got {t_share}; or use overlap: share"
                )
            t_over = t_fixed or t_share
            d_over = d_fixed or cores - t_share
        return cls(t_solo, d_solo, t_over, d_over, shared, (t_phys, d_phys), cores)

    def target(self, overlapped: bool = False) -> int | None:
        """The target pipeline's threads in a phase (overlapped: mirror's suffix || rollouts)."""
        return self.target_overlap if overlapped else self.target_solo

    def draft(self, overlapped: bool = False) -> int | None:
        """The draft pipeline's threads in a phase."""
        return self.draft_overlap if overlapped else self.draft_solo

    def describe(self) -> str:
        """One line for `describe()`, e.g. 'target and draft share cpu (2 cores): ...'."""
        t, d = self.physical

        def n(x: int | None) -> str:
            return "default" if x is None else str(x)

        solo = f"alone: target {n(self.target_solo)}, draft {n(self.draft_solo)} thread(s)"
        over = f"overlapped: target {n(self.target_overlap)}, draft {n(self.draft_overlap)}"
        if d is None:
            return f"threads: target on {t}, {n(self.target_solo)} thread(s)"
        where = (
            f"target and draft share {t} ({self.cores} cores)"
            if self.shared
            else f"target on {t}, draft on {d} (separate devices)"
        )
        return f"threads: {where}; {solo}; {over}"
