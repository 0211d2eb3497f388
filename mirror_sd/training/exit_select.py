"""Which exit head a plan uses, and what the partitioner learns from trained heads.

`speculation.exit_head`:
  - "lm_head": the target's final norm + LM head at ℓe (the logit lens); with
    `exit_vocab_size: K` only the K rows of the target's most frequent own choices;
  - "trained": the heads `mirror-sd train exit-head` cached for this target; the partitioner
    chooses ℓe among the trained layers using their measured held-out agreement;
  - a path to a head file: that head, and its layer fixes ℓe.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mirror_sd.graphs.heads import ExitHead
from mirror_sd.graphs.model import CausalLM
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.partition.cost_model import Profile
from mirror_sd.partition.spec_config import SpecConfig
from mirror_sd.training.exit_head import head_metrics, trained_heads


@dataclass(frozen=True)
class ExitHeads:
    """The exit-head files a plan may use: ℓe -> file, and their measured agreements."""

    files: dict[int, Path] = field(default_factory=dict)
    metrics: dict[int, dict] = field(default_factory=dict)  # ℓe -> head metadata

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.files))

    def table(self) -> str:
        """Held-out agreement with the target per ℓe: logit lens vs trained head."""
        lines = ["exit agreement per ℓe on held-out corpus text (target's token in top-1 / top-4):",
                 "  ℓe   lens top1  lens top4  trained top1  trained top4"]  # fmt: skip
        for layer in self.layers:
            m = self.metrics[layer]
            lens, tr = m.get("lens", {}), m.get("trained", {})
            lines.append(
                f"  {layer:>3}  {lens.get('top1', 0):>9.3f}  {lens.get('top4', 0):>9.3f}  "
                f"{tr.get('top1', 0):>12.3f}  {tr.get('top4', 0):>12.3f}"
            )
        return "\n".join(lines)


def exit_head_files(spec: SpecConfig, target_folder: Path, cache) -> ExitHeads:
    """The candidate head files for `spec.exit_head` (empty for "lm_head").

    Raises:
        FileNotFoundError: "trained" but none is cached for this target, or a missing file.
        ValueError: a fixed `exit_layer` has no trained head, or contradicts a head file.
    """
    if spec.exit_head == "lm_head":
        return ExitHeads()
    if spec.exit_head == "trained":
        files = trained_heads(cache, target_folder)
        if not files:
            raise FileNotFoundError(
                f"speculation.exit_head 'trained': no trained exit head for {target_folder}; "
                f"run `mirror-sd train exit-head {target_folder}` first (or use 'lm_head')"
            )
        if isinstance(spec.exit_layer, int):
            if spec.exit_layer not in files:
                raise ValueError(
                    f"speculation.exit_layer {spec.exit_layer} has no trained exit head; trained "
                    f"layers: {sorted(files)} (train it with `mirror-sd train exit-head "
                    f"--layers {spec.exit_layer}`, or use exit_layer: auto)"
                )
            files = {spec.exit_layer: files[spec.exit_layer]}
    else:
        path = Path(spec.exit_head).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"speculation.exit_head {spec.exit_head!r}: no such file; expected 'lm_head', "
                "'trained' or the path of a file written by `mirror-sd train exit-head`"
            )
        layer = int(torch.load(path, weights_only=True)["layer"])
        if isinstance(spec.exit_layer, int) and spec.exit_layer != layer:
            raise ValueError(
                f"speculation.exit_head {path} was trained at ℓe={layer}, but exit_layer is "
                f"{spec.exit_layer}: set exit_layer to {layer} or 'auto'"
            )
        files = {layer: path}
    return ExitHeads(files, {layer: head_metrics(p) for layer, p in files.items()})


def build_exit_head(
    spec: SpecConfig, layer: int, heads: ExitHeads, model: CausalLM, trim: VocabTrim | None
) -> ExitHead | None:
    """The plan's exit head at ℓe = `layer`: a trained head, a trimmed lens, or None (the
    runner's own full head)."""
    if heads.files:
        return ExitHead.load(heads.files[layer], model)
    if trim is not None:
        return ExitHead(model, layer, trim).eval()
    return None


def with_trained_agreement(profile: Profile, heads: ExitHeads, t_exit_head: float) -> Profile:
    """The profile the partitioner should use with trained heads: exit agreement at ℓe is the
    trained head's held-out top-1 agreement (only trained layers are candidates) and the exit
    head's time is the trained head's."""
    table = {layer: heads.metrics[layer]["trained"]["top1"] for layer in heads.layers}
    note = " | exit agreement: trained heads, held-out stdlib corpus"
    return replace(profile, hit_rate_by_exit_layer=table, t_exit_head=t_exit_head,
                   description=profile.description + note)  # fmt: skip


@torch.inference_mode()
def time_exit_head(head: ExitHead, rows: int, reps: int = 5) -> float:
    """Median seconds of one exit-head call on `rows` hidden rows (on the head's device)."""
    hidden = torch.zeros(1, rows, head.rows.shape[1], device=head.rows.device)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        head.exit_logits(hidden)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])
