"""`compile()`: a Hugging Face causal LM (+ draft) and a device map into a dual-device `Plan`,
in four stages, each a function with a typed result:

    resolve  -> Resolved   the models, tokenizers, configs, map and settings; the graph placed,
                           the map and its execution providers checked before any heavy
                           work; the thread budget
    build    -> Built      the runners, the target's at a provisional ℓe (exports made or
                           reused by `builders`; no torch copy of an ONNX Runtime model here)
    measure  -> Measured   profile + `choose()` (ℓe, κ, γ, branch budget, mode) when the map
                           leaves any of them `auto`; a sim device's profile replaces measuring
    finish   -> Plan       the chosen split (spliced from the per-layer export when mirror wants
                           another ℓe), the exit head and the `CompileReport`
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from mirror_sd.backends.registry import backend_for
from mirror_sd.builders import (
    draft_runner,
    draft_streams,
    draft_trim,
    resolve_precision,
    target_runner,
)
from mirror_sd.devices.sorted_exits import with_sorted_exits
from mirror_sd.devices.torch_device import TorchRunner
from mirror_sd.distributed.runner import TPRunner
from mirror_sd.distributed.target import check_plan, is_tp, tp_target_runner
from mirror_sd.graphs import zoo
from mirror_sd.graphs.amphista import AmphistaHeads
from mirror_sd.graphs.config import ModelConfig, load_config
from mirror_sd.graphs.loader import load_tokenizer, release_memory
from mirror_sd.graphs.streams import StreamTable
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.partition import (
    DeviceMap,
    DeviceMapError,
    Profile,
    SpecConfig,
    choose,
    load_device_map,
    place,
)
from mirror_sd.partition.batch_policy import batch_rows, plan_policy
from mirror_sd.partition.block_bounds import check_block_bounds, tree_rounding
from mirror_sd.partition.placement import Placement, one_alias, plan_graph
from mirror_sd.partition.spec_config import EXIT_THRESHOLDS
from mirror_sd.partition.stages import model_aliases
from mirror_sd.partition.threads import ThreadBudget
from mirror_sd.partition.tree_shape import TreeChoice, resolve_tree
from mirror_sd.pipelined import PipelineRunner, first_alias, pipeline_runner, spans_devices
from mirror_sd.runtime.compile_report import CompileReport
from mirror_sd.runtime.drafters.sources import check_source
from mirror_sd.runtime.exit_tuning import tune_exit_threshold
from mirror_sd.runtime.plan import DeviceSlot, Plan
from mirror_sd.runtime.profiling import (
    ACCEPTANCE_PROMPT,
    CALIBRATION_TEXT,
    auto_retrieval,
    profile,
)
from mirror_sd.runtime.prompts import encode_prompt
from mirror_sd.simulated import sim_profile, with_absolute_profiles
from mirror_sd.training.amphista_select import amphista_file
from mirror_sd.training.exit_select import (
    ExitHeads,
    build_exit_head,
    exit_head_files,
    time_exit_head,
    with_trained_agreement,
)

DEFAULT_BUDGET_WITHOUT_PROFILE = 8  # branch budget when there is no draft to profile
# runners whose ℓe is a setting (torch layers run in Python); an exported split's is its graphs
_MOVABLE_EXIT = (TorchRunner, PipelineRunner, TPRunner)


class TokenizerMismatchError(ValueError):
    """The draft does not share the target's tokenizer, so its tokens mean something else."""


@dataclass(frozen=True)
class Resolved:
    """What the arguments name, checked: `resolve()`'s result."""

    names: tuple[str, str | None]  # target, draft as the caller named them
    dm: DeviceMap
    spec: SpecConfig  # the map's settings with the call's overrides (may hold `auto`)
    mode_asked: str
    t_folder: Path
    d_folder: Path | None
    t_tok: Any  # the target's tokenizer (the draft's is the same)
    t_cfg: ModelConfig
    d_cfg: ModelConfig | None
    heads: ExitHeads  # trained exit heads found for the target (none for lm_head)
    amphista: Path | None  # the Amphista heads file (speculation.amphista), which fixes ℓe
    exit_layer: int  # the provisional ℓe the target's runner is built for
    auto: bool  # ℓe, the branch budget or the mode is left to measure and choose
    placement: Placement  # of the graph at the provisional ℓe
    t_alias: str
    d_alias: str | None
    t_split: bool  # the target's nodes span devices (a PipelineRunner)
    d_split: bool
    budget: ThreadBudget
    onnx_root: Path
    cache: str | Path | None
    profile_data: Profile | None  # given, or the sim devices' (then nothing is measured)
    keep_model: bool  # exit heads / vocabulary trims need the target's torch model
    precision: dict[str, str]  # alias -> how its `auto` precision was chosen (describe())

    @property
    def t_spec(self):
        return self.dm.devices[self.t_alias]

    @property
    def d_spec(self):
        return self.dm.devices[self.d_alias] if self.d_alias else None


@dataclass
class Built:
    """The runners at the provisional ℓe: `build()`'s result."""

    spec: SpecConfig  # with the draft trim's size, when one was made
    t_model: Any  # the target's torch model, or None (an ONNX Runtime target without keep_model)
    t_runner: Any
    t_label: str
    lens: dict[int, float] | None  # logit-lens agreement per ℓe candidate, when measured
    d_runner: Any = None
    d_label: str | None = None
    onnx_path: Path | None = None  # the draft's ONNX file
    d_trim: VocabTrim | None = None
    d_trim_cov: float | None = None
    e_trim: VocabTrim | None = None  # the exit head's vocabulary trim
    d_streams: StreamTable | None = None  # the draft's stream rows (speculative streaming)


@dataclass(frozen=True)
class Measured:
    """`measure()`'s result: the settings to run with and where they came from."""

    spec: SpecConfig  # nothing `auto` left
    choice: Any = None  # the cost model's `Choice`, when it chose
    profile: Profile | None = None
    tree: TreeChoice | None = None  # the speculative round's tree, when a profile sized one
    auto_alone: str = ""  # the retrieval source mode auto runs alone (CompileReport.auto_alone)


def compile(
    target: str | Path,
    draft: str | Path | None = None,
    device_map: str | Path | dict | DeviceMap | None = None,
    *,
    cache: str | Path | None = None,
    onnx_dir: str | Path | None = None,
    profile_data: Profile | None = None,
    draft_trim: VocabTrim | str | Path | None = None,
    **speculation: Any,
) -> Plan:
    """Compile `target` (+ `draft`) into a dual-device `Plan` (resolve -> build -> measure ->
    finish, see the module doc).

    Args:
        target, draft: a known model name (`mirror-sd models list`) or a local HF folder;
            draft None runs the target alone (the map's draft placement and the devices
            only the draft uses are ignored).
        device_map: a YAML path/text, a dict, a `DeviceMap`, or None for the default
            (target and int8 draft in ONNX Runtime on the CPU, mode auto).
        cache: the model cache folder (default $MIRROR_SD_CACHE or ~/.cache/mirror-sd).
        onnx_dir: where exports are cached (default <cache>/onnx).
        profile_data: a measured `Profile` to use instead of profiling now.
        draft_trim: the `VocabTrim` (or its JSON file) for the draft's head instead of
            calibrating one for `speculation.draft_vocab_size` (what `load()` passes).
        **speculation: `SpecConfig` fields overriding the map's `speculation:` section.
    Raises:
        DeviceMapError / PlacementError: the map is malformed or does not fit the models.
        TokenizerMismatchError: the draft's tokenizer differs from the target's.
        ProviderUnavailableError: an execution provider is missing here.
    """
    r = resolve(target, draft, device_map, cache, onnx_dir, profile_data, draft_trim,
                speculation)  # fmt: skip
    b = build(r, draft_trim)
    plan = finish(r, b, measure(r, b))
    if plan.spec.draft_exits != "none" and plan.spec.draft_exit_threshold == "auto":
        tune_exit_threshold(plan, r.t_tok(CALIBRATION_TEXT)["input_ids"])
    return plan


def resolve(target, draft, device_map, cache=None, onnx_dir=None, profile_data=None,
            draft_trim=None, speculation: dict[str, Any] | None = None) -> Resolved:  # fmt: skip
    """Stage 1 (see `compile` for the arguments): read the map, resolve both models, check the
    tokenizers and the retrieval source, place the graph at a provisional ℓe (N/2, or the
    middle trained exit head, unless ℓe is given) and size the thread budget."""
    dm = (
        device_map
        if isinstance(device_map, DeviceMap)
        else (load_device_map(device_map) if device_map is not None else default_device_map())
    )
    if draft is None:  # target only: the map's draft entries do not apply
        dm = dm.without_draft()
    dm = with_absolute_profiles(dm)
    spec = dm.speculation.with_(**(speculation or {}))
    try:
        check_source(spec.retrieval)
    except ValueError as e:
        raise DeviceMapError("speculation.retrieval", str(e), dm.source) from None
    check_block_bounds(spec, dm.source)
    t_folder = zoo.resolve_model(target, cache=cache)
    d_folder = zoo.resolve_model(draft, cache=cache) if draft is not None else None
    t_tok, t_cfg, d_cfg = load_tokenizer(t_folder), load_config(t_folder), None
    check_block_bounds(spec, dm.source, t_cfg.vocab_size)
    if d_folder is not None:
        _check_tokenizers(t_tok, load_tokenizer(d_folder), str(target), str(draft))
        d_cfg = load_config(d_folder)
    try:
        amphista = amphista_file(spec, t_folder, cache)
    except ValueError as e:
        raise DeviceMapError("speculation.amphista", str(e), dm.source) from None
    if amphista is not None:
        spec = spec.with_(exit_layer=amphista[1])
    heads = exit_head_files(spec, t_folder, cache)
    if len(heads.layers) == 1:
        spec = spec.with_(exit_layer=heads.layers[0])
    mode_asked = spec.mode
    exit_layer = (
        spec.exit_layer
        if isinstance(spec.exit_layer, int)
        else (
            heads.layers[len(heads.layers) // 2] if heads.files else max(1, t_cfg.num_layers // 2)
        )
    )
    placement = place(plan_graph(t_cfg, d_cfg, exit_layer), dm.with_speculation(spec))  # validates
    # a model whose nodes span devices runs pipelined (pipelined.py); its first device names it
    t_split = spans_devices(placement, "target")
    d_split = d_folder is not None and spans_devices(placement, "draft")
    t_alias = first_alias(placement, "target") if t_split else one_alias(dm, placement, "target")
    d_alias = None
    if d_folder is not None:
        d_alias = first_alias(placement, "draft") if d_split else one_alias(dm, placement, "draft")
    roles = {}  # alias -> (folder, role); a device running both models resolves as the target's
    if d_folder is not None:
        roles.update({a: (d_folder, "draft") for a in model_aliases(placement.assignment, "draft")})
    roles.update({a: (t_folder, "target") for a in model_aliases(placement.assignment, "target")})
    dm, precision = resolve_precision(dm, roles)  # `auto` precisions made concrete
    t_spec, d_spec = dm.devices[t_alias], dm.devices[d_alias] if d_alias else None
    budget = ThreadBudget.for_devices(
        t_spec, d_spec, spec.overlap, spec.overlap_target_cores or None
    )
    if spec.tree_siblings != "auto" and any(spec.tree_shape) and tree_rounding(t_spec):
        raise DeviceMapError("speculation.tree_siblings", tree_rounding(t_spec), dm.source)
    if spec.draft_exits != "none" and d_spec is not None and (d_spec.backend != "torch" or d_split):
        raise DeviceMapError("speculation.draft_exits", "S2D's exits need the whole draft on a "
                             "`backend: torch` device (an ONNX graph runs whole): see "
                             "examples/device_maps/ort_torch_s2d.yaml", dm.source)  # fmt: skip
    for role, device in (("target", t_spec), ("draft", d_spec)):  # a missing execution
        if device is not None:  # provider fails here, before any export
            backend_for(device).check(device, budget, role)
    return Resolved(
        names=(str(target), None if draft is None else str(draft)), dm=dm, spec=spec,
        mode_asked=mode_asked, t_folder=t_folder, d_folder=d_folder, t_tok=t_tok, t_cfg=t_cfg,
        d_cfg=d_cfg, heads=heads, amphista=amphista[0] if amphista else None,
        exit_layer=exit_layer, placement=placement, precision=precision,
        auto="auto" in (spec.exit_layer, spec.branch_budget, spec.mode, spec.tree_siblings),
        t_alias=t_alias, d_alias=d_alias, t_split=t_split, d_split=d_split, budget=budget,
        onnx_root=Path(onnx_dir) if onnx_dir else zoo.cache_dir(cache) / "onnx", cache=cache,
        # sim devices: plan from their profiles (no measuring), run on the host (simulated.py)
        profile_data=profile_data or sim_profile(dm, t_spec, d_spec, t_cfg.num_layers),
        keep_model=bool(heads.files or spec.draft_vocab_size or draft_trim is not None
                        or spec.exit_vocab_size or amphista),
    )  # fmt: skip


def build(r: Resolved, given_trim: VocabTrim | str | Path | None = None) -> Built:
    """Stage 2: the runners at the provisional ℓe. An untrimmed ONNX Runtime draft is exported
    first (its export's memory is gone before the target's), then the target (its logit lens
    measured on the way when stage 3 will profile), then the draft runner and the trims."""
    spec, dm, budget = r.spec, r.dm, r.budget
    profiling = r.d_folder is not None and r.auto and r.profile_data is None
    lens_ids = r.t_tok(CALIBRATION_TEXT)["input_ids"] if profiling else None
    d_onnx = None
    trimmed = bool(spec.draft_vocab_size or given_trim is not None)
    if r.d_folder is not None and not r.d_split and not trimmed:  # exporting backends only
        d_onnx = backend_for(r.d_spec).draft_export(r.d_spec, r.d_folder, r.onnx_root)
    check_plan(r.t_spec, r.d_spec, r.keep_model, dm.source)  # what tensor_parallel cannot do yet
    if r.t_split:
        t_model, t_runner, t_label = pipeline_runner(
            dm, r.placement, "target", r.t_folder, spec.max_len, r.exit_layer, budget.target()
        )
        lens = None
    elif is_tp(r.t_spec):  # ranks > 0 serve rank 0 inside this call (distributed/target.py)
        t_model, t_runner, t_label, lens = tp_target_runner(
            r.t_spec, r.t_folder, r.exit_layer, spec.max_len, lens_ids, dm.source
        )
    else:
        t_model, t_runner, t_label, lens = target_runner(
            r.t_spec, r.t_folder, r.exit_layer, spec.max_len, r.onnx_root, budget, lens_ids,
            r.keep_model,
        )  # fmt: skip
    b = Built(spec, t_model, t_runner, t_label, lens)
    if r.d_folder is not None:
        if spec.draft_vocab_size or given_trim is not None:
            b.d_trim, b.d_trim_cov = draft_trim(
                spec.draft_vocab_size, given_trim, r.t_folder, r.t_tok, t_model, r.cache
            )
            b.spec = spec.with_(draft_vocab_size=b.d_trim.size)
        if spec.draft_streams != "none":
            if r.d_split:
                raise DeviceMapError("speculation.draft_streams", "a draft spread over devices "
                                     "runs without stream rows: set draft_streams: none",
                                     dm.source)  # fmt: skip
            b.d_streams = draft_streams(spec.draft_streams, r.d_folder, r.t_folder, r.d_cfg,
                                        r.cache)  # fmt: skip
        if r.d_split:
            if b.d_trim is not None:
                raise DeviceMapError("speculation.draft_vocab_size", "a draft spread over "
                                     "devices keeps its full head: set draft_vocab_size: 0",
                                     dm.source)  # fmt: skip
            _, b.d_runner, b.d_label = pipeline_runner(
                dm, r.placement, "draft", r.d_folder, spec.max_len, 0, budget.draft()
            )
        else:
            b.d_runner, b.d_label, b.onnx_path = draft_runner(
                r.d_spec, r.d_folder, spec.max_len, r.onnx_root, b.d_trim, budget, d_onnx,
                b.d_streams,
            )  # fmt: skip
        if spec.draft_exits != "none":  # S2D: the torch draft stops at its first sure exit
            try:
                t = spec.draft_exit_threshold  # "auto": measured once the plan exists
                b.d_runner = with_sorted_exits(b.d_runner, spec.draft_exits,
                                               EXIT_THRESHOLDS[0] if t == "auto" else t,
                                               r.d_folder, r.cache)  # fmt: skip
            except ValueError as e:
                raise DeviceMapError("speculation.draft_exits", str(e), dm.source) from None
    if spec.exit_head == "lm_head" and spec.exit_vocab_size:
        b.e_trim, _ = draft_trim(spec.exit_vocab_size, None, r.t_folder, r.t_tok, t_model, r.cache)
    return b


def measure(r: Resolved, b: Built) -> Measured:
    """Stage 3: when something is `auto`, profile the two runners (or take the given / sim
    profile) and let the cost model choose ℓe, κ, γ, the branch budget and the mode; with no
    draft there is nothing to tune (autoregressive)."""
    spec = b.spec
    if not r.auto:
        return Measured(spec)
    if b.d_runner is None:
        spec = spec.with_(exit_layer=r.exit_layer, branch_budget=DEFAULT_BUDGET_WITHOUT_PROFILE)
        spec = resolve_tree(None, spec, r.t_spec)[0]
        return Measured(spec.with_(mode="autoregressive") if spec.mode == "auto" else spec)
    ids = r.t_tok(CALIBRATION_TEXT)["input_ids"]
    target, draft = r.names
    prof = r.profile_data or profile(
        b.t_runner, b.d_runner, b.lens if b.lens is not None else b.t_model, ids,
        max_block=spec.num_draft_tokens + 1, description=f"{target} <- {draft}",
        budget=r.budget, extra_rows=batch_rows(spec.num_draft_tokens),
        acceptance_ids=encode_prompt(r.t_tok, ACCEPTANCE_PROMPT), retrieval=auto_retrieval(spec),
    )  # fmt: skip
    if r.heads.files or b.e_trim is not None:  # the exit head in use, not the full lens
        probe = build_exit_head(spec, r.exit_layer, r.heads, b.t_model, b.e_trim)
        t_exit = time_exit_head(probe, spec.num_draft_tokens + 1)
        prof = (
            with_trained_agreement(prof, r.heads, t_exit)
            if r.heads.files
            else replace(prof, t_exit_head=t_exit)
        )
    if b.d_streams is not None:  # the chain's cost with stream rows, by their accuracy
        prof = replace(prof, stream_accuracy=b.d_streams.guess_accuracy())
    # maximize predicted speedup: a hidden draft with a near-zero hit rate (an early ℓe
    # whose exit head rarely contains the verdict) loses to a later ℓe that hits
    choice = choose(prof, spec, exit_layers=r.heads.layers or None, prefer_hidden=False)
    spec = choice.spec
    alone = ""
    if spec.mode == "auto":  # the cost model's verdict for this machine, kept in the plan
        spec = spec.with_(mode=choice.best_mode)
        if choice.best_candidate == "retrieval":  # its source alone; the draft stays loaded
            alone = choice.retrieval_source
            spec = spec.with_(retrieval=alone, model_draft=False)
    spec, tree = resolve_tree(prof, spec, r.t_spec)
    return Measured(spec, choice, prof, tree, alone)


def finish(r: Resolved, b: Built, m: Measured) -> Plan:
    """Stage 4: the plan. ℓe matters only to mirror rounds: in any other mode an exported
    target keeps its provisional split (`kept_split`); for mirror at another ℓe the split is
    spliced from the per-layer export and its sessions replace the provisional ones."""
    spec, t_model, t_runner, placement = m.spec, b.t_model, b.t_runner, r.placement
    movable = isinstance(t_runner, _MOVABLE_EXIT)
    kept_split = None
    if spec.exit_layer != r.exit_layer and not movable and spec.mode != "mirror":
        kept_split = (r.exit_layer, spec.exit_layer)
        spec = spec.with_(exit_layer=r.exit_layer)
    if spec.exit_layer != r.exit_layer:
        if movable:
            t_runner.exit_layer = spec.exit_layer
        else:  # graphs fix ℓe: splice the chosen split from the per-layer export
            b.t_runner = t_runner = None  # free the provisional split's sessions first
            release_memory()
            t_model, t_runner, _, _ = target_runner(
                r.t_spec, r.t_folder, spec.exit_layer, spec.max_len, r.onnx_root, r.budget,
                keep_model=r.keep_model,
            )  # fmt: skip
    graph = plan_graph(r.t_cfg, r.d_cfg, spec.exit_layer)
    if spec.exit_layer != r.exit_layer:
        placement = place(graph, r.dm.with_speculation(spec))
    exit_head = build_exit_head(spec, spec.exit_layer, r.heads, t_model, b.e_trim)
    amphista = AmphistaHeads.load(r.amphista, t_model) if r.amphista is not None else None
    # with `mode: auto` stream rows run unless the measured profile says the one-token chain
    # is cheaper; a mode given by the user runs them as asked
    streams_used = b.d_streams is not None and (
        r.mode_asked != "auto" or m.profile is None or not m.profile.stream_accuracy
        or m.profile.streams_pay(spec.num_draft_tokens)
    )  # fmt: skip
    gen_cfg_file = r.t_folder / "generation_config.json"
    report = CompileReport(
        target=str(r.t_folder), draft=str(r.d_folder) if r.d_folder else None,
        device_map=r.dm.with_speculation(spec).to_dict(),
        graph=graph, placement=placement,
        mode_asked=r.mode_asked, choice=m.choice, profile=m.profile,
        auto_alone=m.auto_alone,
        onnx=str(b.onnx_path) if b.onnx_path else None,
        draft_placement=getattr(b.d_runner, "placement", None), draft_trim=b.d_trim,
        draft_trim_coverage=b.d_trim_cov, exit_heads=r.heads, kept_split=kept_split,
        draft_streams=b.d_streams, draft_streams_used=streams_used,
        precision=r.precision, tree=m.tree,
        batch_policy=plan_policy(m.profile, spec, b.d_runner is not None),
    )  # fmt: skip
    d_slot = None
    if b.d_runner is not None:
        d_slot = DeviceSlot(_slot_alias(placement, "draft", r.d_alias), b.d_label)
    return Plan(
        target=t_runner,
        target_device=DeviceSlot(_slot_alias(placement, "target", r.t_alias), b.t_label),
        draft=b.d_runner,
        draft_device=d_slot,
        tokenizer=r.t_tok,
        spec=spec,
        generation_config=json.loads(gen_cfg_file.read_text()) if gen_cfg_file.is_file() else None,
        device_specs=(r.t_spec, r.d_spec),
        report=report,
        accept_rate=m.profile.accept_rate if m.profile is not None else None,
        exit_head=exit_head,
        batch_policy=report.batch_policy,
        draft_streams=b.d_streams.ids() if streams_used else (),
        trees=tree_rounding(r.t_spec),
        amphista=amphista,
    )


def default_device_map() -> DeviceMap:
    """The packaged default (examples/device_maps/ort_ort_cpu.yaml): target and int8 draft in
    ONNX Runtime on the CPU, sharing its cores by the thread budget, mode auto."""
    text = resources.files("mirror_sd.device_maps").joinpath("default.yaml").read_text()
    return load_device_map(text)


def _check_tokenizers(t_tok, d_tok, target: str, draft: str) -> None:
    tv, dv = t_tok.get_vocab(), d_tok.get_vocab()
    if tv != dv:
        diff = sorted(set(tv.items()) ^ set(dv.items()))[:3]
        raise TokenizerMismatchError(
            f"draft {draft!r} has a different tokenizer than target {target!r} "
            f"(vocab {len(dv)} vs {len(tv)} entries; e.g. {diff}); speculative decoding needs "
            "the same tokenizer: pick a draft from the target's model family"
        )


def _slot_alias(placement, model: str, alias: str) -> str:
    """The name of a model's pipeline: its device alias, or 'dev0+dev1' when spread."""
    return (
        "+".join(model_aliases(placement.assignment, model))
        if spans_devices(placement, model)
        else alias
    )
