"""Plans for hardware we do not have: `backend: sim` devices in a live plan.

A sim device (`SimSpec`) names a cost `Profile` JSON file measured on (or written for) the
hardware it stands for. compile() accepts it:

- **Planning** uses the sim profile instead of measuring: ℓe, κ, the branch budget, γ and
  `mode: auto` are chosen for that hardware, and describe() shows the predicted speedups.
  With sim devices on both sides and two different files, the target's timings come from
  the target's file and the draft's `t_draft` from the draft's; with one sim device, its
  file is the whole profile (the real device's timings in it are taken as given).
- **Running** happens on this host: a sim device runs its model with torch on the CPU in
  float32, so the plan's output can be checked token for token against the target's own
  greedy decoding. Wall times and tokens/s of such a run are this host's, not the simulated
  hardware's; the predicted figures are the profile's (`mirror-sd bench --simulate` replays
  measured rounds on it).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mirror_sd.partition import DeviceMap, DeviceMapError, Profile, SimSpec, TorchSpec

SIM_HOST_DEVICE = "cpu"  # where a sim device's model really runs
SIM_HOST_DTYPE = "float32"


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


def sim_profile(
    dm: DeviceMap, target: object, draft: object | None, num_layers: int
) -> Profile | None:
    """The profile a plan with sim devices is planned from; None when neither is sim.
    `num_layers`: the target's, which the profile must describe (else DeviceMapError)."""
    t = load_sim_profile(dm, target) if isinstance(target, SimSpec) else None
    d = load_sim_profile(dm, draft) if isinstance(draft, SimSpec) else None
    if t is not None and d is not None and target.profile != draft.profile:
        t = replace(t, t_draft=d.t_draft, description=f"{t.description} | draft: {d.description}")
    prof, spec = (t, target) if t is not None else (d, draft)
    if prof is not None and prof.num_layers != num_layers:
        raise DeviceMapError(
            f"devices.{spec.alias}.profile",
            f"the profile describes a {prof.num_layers}-layer target, this target has "
            f"{num_layers} layers: use a profile measured (or written) for this target",
            dm.source,
        )
    return prof


def with_absolute_profiles(dm: DeviceMap) -> DeviceMap:
    """`dm` with every sim device's profile path made absolute (resolved against the map's
    folder), so that a saved plan's map still finds its profiles from anywhere."""
    devices = {
        alias: replace(s, profile=str(Path(dm.resolve(s.profile)).resolve()))
        if isinstance(s, SimSpec)
        else s
        for alias, s in dm.devices.items()
    }
    return replace(dm, devices=devices)


def host_spec(spec: SimSpec) -> TorchSpec:
    """The torch device a sim device's model really runs on here (host CPU, float32)."""
    return TorchSpec(spec.alias, SIM_HOST_DEVICE, SIM_HOST_DTYPE, None)


def sim_label(spec: SimSpec) -> str:
    """How describe() and results name a sim device."""
    return f"sim {spec.alias} (profile {spec.profile}; runs on torch {SIM_HOST_DEVICE} here)"
