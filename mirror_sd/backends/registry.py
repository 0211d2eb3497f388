"""The backend registry: one `Backend` per family of the device map, keyed by its spec type.

`backend_for(spec)` is how compile(), the builders and the plan hooks dispatch on the kind of
a device (never isinstance chains on spec types). The partitioner asks only the families'
facts (`facts.capabilities`), which import no device API; this module imports them all.
"""

from __future__ import annotations

from mirror_sd.backends.base import Backend
from mirror_sd.backends.facts import owner
from mirror_sd.backends.ort import OrtBackend
from mirror_sd.backends.pytorch import TorchBackend
from mirror_sd.backends.sim import SimBackend
from mirror_sd.partition.device_map import DeviceSpec

BACKENDS: dict[type[DeviceSpec], Backend] = {
    b.spec_type: b for b in (OrtBackend(), TorchBackend(), SimBackend())
}


def backend_for(spec: object) -> Backend:
    """The backend that owns `spec` (a subclass of a registered spec type counts as it).

    Raises:
        TypeError: no backend owns the spec's type; the message names the registered ones.
    """
    return owner(BACKENDS, spec)
