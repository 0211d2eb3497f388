"""The `Backend` protocol: a family's `Facts` (facts.py) plus what it builds.

Every family (onnxruntime, torch, sim) owns one `DeviceSpec` type and answers, per map entry:

    capabilities       facts the partitioner asks (pure; `facts.Facts`)
    resolve_precision  its `auto` precision keys made concrete (pure: facts in, spec out)
    check              what must fail before any export (a missing execution provider)
    draft_export       the draft's file made before the target loads (exporting families)
    torch_spec         the torch device its model runs on in this process, if any
    planning_profile   a cost profile to plan from instead of measuring (sim)
    with_absolute_paths  the spec with the files it names resolved against the map's folder
    target_runner      the target's (torch model or None, runner, label, lens)
    draft_runner       the draft's (runner, label, ONNX path or None)

Only `capabilities`, `target_runner` and `draft_runner` have no default.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror_sd.backends.facts import Facts
from mirror_sd.partition.device_map import DeviceSpec

if TYPE_CHECKING:
    from mirror_sd.graphs.streams import StreamTable
    from mirror_sd.graphs.vocab_trim import VocabTrim
    from mirror_sd.partition.cost_model import Profile
    from mirror_sd.partition.device_map import DeviceMap, TorchSpec
    from mirror_sd.partition.precision import CpuCaps
    from mirror_sd.partition.threads import ThreadBudget


class Backend(Facts):
    """One backend family of the device map (module doc)."""

    def resolve_precision(
        self, spec: Any, checkpoint: str, caps: CpuCaps, role: str = "target"
    ) -> tuple[DeviceSpec, str | None]:
        """(the spec with every `auto` precision key concrete, describe()'s note or None).
        `checkpoint` is the precision the model's weights were published at, `caps` the host
        CPU's (`partition.precision`), `role` "target" or "draft": the model the device runs (a
        device running both resolves as the target's)."""
        return spec, None

    def check(self, spec: Any, budget: ThreadBudget | None, role: str) -> None:
        """Fail before any export when this entry cannot run here (default: nothing to check)."""
        return None

    def draft_export(self, spec: Any, folder: Path, onnx_dir: Path) -> Path | None:
        """The untrimmed draft's exported file, made before the target loads; None for a
        family that runs the draft from its weights."""
        return None

    def torch_spec(self, spec: Any) -> TorchSpec | None:
        """The torch device this entry's model runs on in this process (a spread model's
        stages, a tensor-parallel target); None when it runs no torch model."""
        return None

    def planning_profile(self, spec: Any, dm: DeviceMap) -> Profile | None:
        """The cost profile compile() plans from instead of measuring; None: measure."""
        return None

    def with_absolute_paths(self, spec: Any, dm: DeviceMap) -> DeviceSpec:
        """The spec with every file it names resolved against the map's folder."""
        return spec

    @abstractmethod
    def target_runner(self, spec: Any, folder: Path, exit_layer: int, max_len: int,
                      onnx_root: Path, budget: ThreadBudget | None = None,
                      lens_ids: list[int] | None = None, keep_model: bool = True
                      ) -> tuple[Any, Any, str, dict | None]:  # fmt: skip
        """(torch model or None, runner, label, lens agreement or None) for the target
        (`builders.target_runner` says what each argument means)."""

    @abstractmethod
    def draft_runner(self, spec: Any, folder: Path, max_len: int, onnx_dir: Path,
                     trim: VocabTrim | None = None, budget: ThreadBudget | None = None,
                     onnx: Path | None = None, streams: StreamTable | None = None
                     ) -> tuple[Any, str, Path | None]:  # fmt: skip
        """(runner, label, ONNX path or None) for the draft (`builders.draft_runner`)."""
