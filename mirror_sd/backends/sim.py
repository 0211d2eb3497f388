"""The sim family (`backend: sim`, `SimSpec`): hardware we do not have, named by a cost
`Profile` file. compile() plans from the profile (`planning_profile`) and runs the model with
torch on the host CPU in float32 (`torch_spec`), so the plan's output stays checkable token for
token; `mirror_sd/simulated.py` says how such a plan behaves.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mirror_sd.backends.base import Backend
from mirror_sd.backends.facts import SimFacts
from mirror_sd.backends.pytorch import TorchBackend
from mirror_sd.partition.cost_model import Profile
from mirror_sd.partition.device_map import DeviceMap, DeviceMapError, SimSpec, TorchSpec
from mirror_sd.partition.precision import CpuCaps

SIM_HOST_DEVICE = "cpu"  # where a sim device's model really runs
SIM_HOST_DTYPE = "float32"


def host_spec(spec: SimSpec) -> TorchSpec:
    """The torch device a sim device's model really runs on here (host CPU, float32)."""
    return TorchSpec(spec.alias, SIM_HOST_DEVICE, SIM_HOST_DTYPE, None)


def sim_label(spec: SimSpec) -> str:
    """How describe() and results name a sim device."""
    return f"sim {spec.alias} (profile {spec.profile}; runs on torch {SIM_HOST_DEVICE} here)"


def load_sim_profile(dm: DeviceMap, spec: SimSpec) -> Profile:
    """The profile a sim device names (relative to the map's folder); a missing or malformed
    file is a DeviceMapError at `devices.<alias>.profile`."""
    path = dm.resolve(spec.profile)
    if not Path(path).is_file():
        raise DeviceMapError(
            f"devices.{spec.alias}.profile",
            f"no profile file {str(path)!r}: write one with `mirror-sd bench` (profile.json) "
            "or Profile.save(), or give the right path (relative to the map's folder)",
            dm.source,
        )
    try:
        return Profile.load(path)
    except ValueError as e:
        raise DeviceMapError(f"devices.{spec.alias}.profile", str(e), dm.source) from None


class SimBackend(SimFacts, TorchBackend):
    """Sim devices: planned from their profile, run as a torch float32 model on the host CPU
    (the torch family's runners, with the sim label)."""

    def resolve_precision(
        self, spec: SimSpec, checkpoint: str, caps: CpuCaps, role: str = "target"
    ) -> tuple[SimSpec, None]:
        return Backend.resolve_precision(self, spec, checkpoint, caps)  # no precision keys

    def torch_spec(self, spec: SimSpec) -> TorchSpec:
        return host_spec(spec)

    def label(self, spec: SimSpec, dev: object) -> str:
        return sim_label(spec)

    def planning_profile(self, spec: SimSpec, dm: DeviceMap) -> Profile:
        return load_sim_profile(dm, spec)

    def with_absolute_paths(self, spec: SimSpec, dm: DeviceMap) -> SimSpec:
        return replace(spec, profile=str(Path(dm.resolve(spec.profile)).resolve()))
