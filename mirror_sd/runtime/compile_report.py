"""`CompileReport`: what compile() resolved, measured and decided, as a typed record.

`describe()`, `save()` and the benchmark read it; the runtime does not (what a generation
needs, such as the acceptance-rate prior, is passed to the `Plan` explicitly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mirror_sd.graphs.model_graph import ModelGraph
    from mirror_sd.graphs.streams import StreamTable
    from mirror_sd.graphs.vocab_trim import VocabTrim
    from mirror_sd.partition.cost_model import Choice, Profile
    from mirror_sd.partition.placement import Placement
    from mirror_sd.partition.tree_shape import TreeChoice


@dataclass
class CompileReport:
    """One compiled plan's facts.

    target, draft: the model folders used (draft None: target-only)
    device_map: the map with the chosen speculation values, as a YAML mapping
    graph, placement: the dataflow graph and where each node runs
    mode_asked: the mode the map / call asked for ("auto": `choice` picked the plan's mode)
    choice, profile: the cost model's choice and the measurements behind it (None when
        nothing was `auto`, or after `load()` without a saved profile)
    onnx: the draft's exported ONNX file (None for a torch draft)
    draft_placement: which execution providers run the draft's nodes
    draft_trim, draft_trim_coverage: the draft head's VocabTrim and its calibration coverage
    exit_heads: the trained exit heads found for the target (training.exit_select)
    kept_split: (ℓe kept, ℓe the cost model chose for mirror) when the plan's mode has no
        mirror rounds (asked, or chosen by `mode: auto`) and the target is exported: the
        split compiled first is kept (ℓe only matters to mirror rounds; another split is
        assembled from the per-layer export in seconds, but its sessions load the weights
        again)
    precision: device alias -> how its `quantize: auto` / `dtype: auto` was resolved
    batch_policy: mode and γ per live batch size (`partition.batch_policy`; () without a
        profile)
    draft_streams, draft_streams_used: the draft's stream rows (speculative streaming) or
        None, and whether the plan runs them (with `mode: auto` the cost model turns them
        off where the profile predicts the one-token chain cheaper)
    exit_thresholds: S2D with `draft_exit_threshold: auto`: tokens/s measured at each
        threshold compile tried (the plan keeps the fastest); None otherwise
    tree: the token tree the cost model sized for speculative rounds (`partition.tree_shape`;
        the plan runs it where `tree_siblings: auto` and the mode is speculative); None
        without a profile with sibling coverage
    auto_alone: the retrieval source `mode: auto` runs alone, the draft idle (`retrieval`
        and `model_draft: false` in the plan's speculation), "" when it picked no such mode;
        those two settings belong to the plan's own mode: a call that names a mode runs the
        map's draft (`runtime/batch.py`)
    """

    target: str
    draft: str | None
    device_map: dict[str, Any]
    graph: ModelGraph
    placement: Placement
    mode_asked: str
    choice: Choice | None = None
    profile: Profile | None = None
    onnx: str | None = None
    draft_placement: str | None = None
    draft_trim: VocabTrim | None = None
    draft_trim_coverage: float | None = None
    exit_heads: Any = None
    kept_split: tuple[int, int] | None = None
    precision: dict[str, str] = field(default_factory=dict)
    batch_policy: tuple = ()
    draft_streams: StreamTable | None = None
    draft_streams_used: bool = False
    exit_thresholds: dict[float, float] | None = None
    tree: TreeChoice | None = None
    auto_alone: str = ""
