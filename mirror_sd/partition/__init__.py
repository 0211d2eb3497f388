"""WHERE it runs: device maps, placement, capabilities and the cost model (pure: no device APIs)."""

from mirror_sd.partition.cost_model import Choice, Profile, choose
from mirror_sd.partition.device_map import (
    DeviceMap,
    DeviceMapError,
    DeviceSpec,
    OrtSpec,
    SimSpec,
    TorchSpec,
)
from mirror_sd.partition.device_map_load import load_device_map
from mirror_sd.partition.placement import (
    CutEdge,
    Placement,
    PlacementError,
    check_capabilities,
    place,
)
from mirror_sd.partition.spec_config import SpecConfig

__all__ = [
    "Choice",
    "CutEdge",
    "DeviceMap",
    "DeviceMapError",
    "DeviceSpec",
    "OrtSpec",
    "Placement",
    "PlacementError",
    "Profile",
    "SimSpec",
    "SpecConfig",
    "TorchSpec",
    "check_capabilities",
    "choose",
    "load_device_map",
    "place",
]
