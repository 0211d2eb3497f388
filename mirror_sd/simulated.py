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

The sim family's own facts (its host torch device, its label, reading its profile) live in
`mirror_sd/backends/sim.py`; this module is what a plan does with them.
"""

from __future__ import annotations

from dataclasses import replace

from mirror_sd.backends.registry import backend_for
from mirror_sd.partition import DeviceMap, DeviceMapError, Profile


def sim_profile(
    dm: DeviceMap, target: object, draft: object | None, num_layers: int
) -> Profile | None:
    """The profile a plan with sim devices is planned from (each device's backend says:
    `planning_profile`); None when neither is sim. `num_layers`: the target's, which the
    profile must describe (else DeviceMapError)."""
    t = backend_for(target).planning_profile(target, dm)
    d = backend_for(draft).planning_profile(draft, dm) if draft is not None else None
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
    """`dm` with every file a device names (a sim device's profile) made absolute (resolved
    against the map's folder), so that a saved plan's map still finds its profiles from
    anywhere."""
    devices = {alias: backend_for(s).with_absolute_paths(s, dm) for alias, s in dm.devices.items()}
    return replace(dm, devices=devices)
