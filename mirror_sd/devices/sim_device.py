"""SimDevice: a device that runs nothing and returns timings from a cost `Profile`.

It stands in for hardware we do not have (a datacenter GPU, an NPU): the benchmark's
simulator replays measured rounds on it, and the scheduler's timing logic can be
exercised without compute. Times are seconds. Between measured sizes they are linearly
interpolated (as `Profile` does); beyond the largest measured size they are linearly
extrapolated from the last two measurements, and every such call is recorded in
`extrapolated` so a report can say which numbers rest on it.
"""

from __future__ import annotations

from mirror_sd.partition.cost_model import Profile, prefix_time, suffix_time


class SimDevice:
    """Timings of the target (t_T, prefix, suffix, exit head) and draft (t_d) from `profile`."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.extrapolated: set[tuple[str, int]] = set()  # (table, size) beyond the measurements

    @property
    def num_layers(self) -> int:
        return self.profile.num_layers

    @property
    def t_chan(self) -> float:
        """Token channel latency, target -> draft device."""
        return self.profile.t_chan

    @property
    def t_sync(self) -> float:
        """Rendezvous overhead per round."""
        return self.profile.t_sync

    def _lookup(self, name: str, table: dict[int, float], n: int) -> float:
        if n < 1:
            raise ValueError(f"{name}({n}): sizes start at 1")
        keys = sorted(table)
        if n <= keys[-1]:
            return self.profile.target(n) if name == "t_target" else self.profile.draft(n)
        self.extrapolated.add((name, n))
        if len(keys) == 1:
            return table[keys[0]]
        lo, hi = keys[-2], keys[-1]
        slope = max(0.0, (table[hi] - table[lo]) / (hi - lo))
        return table[hi] + slope * (n - hi)

    def time_target(self, n: int) -> float:
        """t_T(n): one full target forward on n new rows."""
        return self._lookup("t_target", self.profile.t_target, n)

    def time_draft(self, b: int) -> float:
        """t_d(b): one draft step over b branch rows."""
        return self._lookup("t_draft", self.profile.t_draft, b)

    def time_prefix(self, n: int, exit_layer: int) -> float:
        """t_pre: target layers [0, ℓe) on n rows (uniform layers)."""
        return prefix_time(self.time_target(n), self._layer(exit_layer), self.num_layers)

    def time_suffix(self, n: int, exit_layer: int) -> float:
        """t_suf: target layers [ℓe, N) + final norm and LM head on n rows."""
        return suffix_time(self.time_target(n), self._layer(exit_layer), self.num_layers)

    def time_exit_head(self) -> float:
        """The exit head on one block (target device, between prefix and suffix)."""
        return self.profile.t_exit_head

    def describe(self) -> str:
        return f"sim ({self.profile.description or 'cost profile'})"

    def _layer(self, exit_layer: int) -> int:
        if not 1 <= exit_layer < self.num_layers:
            raise ValueError(
                f"exit_layer {exit_layer} outside 1..{self.num_layers - 1} of this profile"
            )
        return exit_layer
