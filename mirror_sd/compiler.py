"""`compile()`: a Hugging Face causal LM (+ draft) and a device map into a dual-device `Plan`.

compile = resolve models -> check tokenizers -> graph -> placement (device map) -> thread
budget -> devices (torch or ONNX Runtime target, ONNX Runtime or torch draft; exports cached)
-> profile + choose (ℓe, κ, γ, branch budget, mode) when the map says `auto` -> Plan with
its `CompileReport`. Also `quantization_report()` (int8 / int4 vs fp32 of one model).
"""

from __future__ import annotations

import json
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from mirror_sd import export_worker
from mirror_sd.devices.ort_core import OrtDevice
from mirror_sd.devices.ort_device import OrtRunner
from mirror_sd.devices.ort_split import (
    OrtSplitRunner,
    SplitGraphs,
    export_split,
    split_needs_weights,
)
from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.devices.trimmed import TrimmedVocabRunner
from mirror_sd.distributed.runner import TPRunner
from mirror_sd.distributed.target import check_plan, is_tp, tp_target_runner
from mirror_sd.export_worker import cached_lens, measure_lens
from mirror_sd.graphs import zoo
from mirror_sd.graphs.config import load_config
from mirror_sd.graphs.export import export_cached, find_cached, source_identity
from mirror_sd.graphs.loader import load_model, load_tokenizer, release_memory, weightless_model
from mirror_sd.graphs.model_graph import ModelGraph
from mirror_sd.graphs.trimmed_head import export_trimmed, with_trimmed_head
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.partition import (
    DeviceMap,
    DeviceMapError,
    OrtSpec,
    Profile,
    SimSpec,
    SpecConfig,
    TorchSpec,
    choose,
    load_device_map,
    place,
)
from mirror_sd.partition.stages import model_aliases
from mirror_sd.partition.threads import ThreadBudget
from mirror_sd.pipelined import PipelineRunner, first_alias, pipeline_runner, spans_devices
from mirror_sd.runtime.compile_report import CompileReport
from mirror_sd.runtime.drafters.sources import check_source
from mirror_sd.runtime.plan import DeviceSlot, Plan
from mirror_sd.runtime.profiling import (
    CALIBRATION_TEXT,
    profile,
)
from mirror_sd.simulated import host_spec, sim_label, sim_profile, with_absolute_profiles
from mirror_sd.training.exit_select import (
    build_exit_head,
    exit_head_files,
    time_exit_head,
    with_trained_agreement,
)

DEFAULT_BUDGET_WITHOUT_PROFILE = 8  # branch budget when there is no draft to profile


class TokenizerMismatchError(ValueError):
    """The draft does not share the target's tokenizer, so its tokens mean something else."""


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


def _alias_of(dm: DeviceMap, assignment: dict[str, str], prefix: str) -> str:
    aliases = {a for n, a in assignment.items() if n.startswith(prefix + ".")}
    if len(aliases) != 1:
        raise DeviceMapError(
            "placement",
            f"all {prefix}.* nodes must be on one device in schema v1, got {sorted(aliases)}",
            dm.source,
        )
    return aliases.pop()


def _torch_device(spec, threads: int | None = None) -> TorchDevice:
    """The torch device of a map entry; `threads` is the thread budget's count when alone."""
    if not isinstance(spec, TorchSpec):
        raise DeviceMapError(
            f"devices.{spec.alias}",
            f"the target needs a torch device in this version, got backend {spec.backend!r}",
        )
    return TorchDevice(spec.device, threads or spec.threads, spec.dtype)


def _ort_device(
    spec: OrtSpec, budget: ThreadBudget | None = None, role: str = "target"
) -> OrtDevice:
    """The ORT device of a map entry, its sessions sized by the thread budget (the count a
    pipeline gets when it runs alone). When target and draft share the cores, pool threads
    spin only while a run lasts (`OrtDevice.spin_stop`), never into the other's turn."""
    threads = spec.intra_op_threads
    if budget is not None:
        threads = budget.target() if role == "target" else budget.draft()
    dev = OrtDevice(spec.providers, threads, spec.inter_op_threads, spec.optimization_level,
                    spec.allow_fallback, spin_stop=bool(budget and budget.shared))  # fmt: skip
    dev.check()
    return dev


def _target_runner(spec, folder: Path, exit_layer: int, max_len: int, onnx_root: Path,
                   budget: ThreadBudget | None = None, lens_ids: list[int] | None = None,
                   keep_model: bool = True):  # fmt: skip
    """(torch model or None, runner, label, lens agreement or None) for the target.

    An ORT target's graphs are spliced from its per-layer export (`graphs.layered`); with
    `lens_ids` the logit-lens agreement per ℓe candidate comes along (kept beside the export,
    `export_worker.measure_lens`). Without `keep_model` this process never loads the target's
    torch model: a missing export or lens is made by `export_worker` (a worker process for a
    large model, whose memory leaves with it), and None is returned for the model. With
    `keep_model` (exit heads, vocabulary trims) the model is loaded here and returned."""
    if isinstance(spec, OrtSpec):
        quant = None if spec.quantize == "none" else spec.quantize
        key, meta = source_identity(folder), weightless_model(folder)
        model = lens = None
        if keep_model:  # exit heads / vocabulary trims are built from it: it stays loaded
            model = load_model(folder, "float32")
            graphs = export_split(model, onnx_root, key, exit_layer, quant)
            lens = measure_lens(model, onnx_root, key, lens_ids) if lens_ids else None
        else:
            lens = cached_lens(meta, onnx_root, key, lens_ids) if lens_ids else None
            if (lens_ids and lens is None) or split_needs_weights(
                meta, onnx_root, key, exit_layer, quant
            ):  # export and measure in a worker process: its memory leaves with it
                out = export_worker.run("target", folder, onnx_dir=str(onnx_root),
                                        exit_layer=exit_layer, quantize=quant,
                                        lens_ids=None if lens else lens_ids)  # fmt: skip
                graphs = SplitGraphs(*(Path(p) for p in out["graphs"]))
                lens = lens or out["lens"]
            else:  # every graph cached, or spliced from the cached per-layer export
                graphs = export_split(meta, onnx_root, key, exit_layer, quant)
        n_layers, width = meta.num_layers, meta.config.hidden_size
        release_memory()  # freed heap back to the OS before the sessions load
        runner = OrtSplitRunner.from_graphs(
            graphs, n_layers, width, exit_layer, max_len, _ort_device(spec, budget, "target"),
            alias=spec.alias, quantize=quant,
        )  # fmt: skip
        precision = f" {spec.quantize} weights" if spec.quantize != "none" else ""
        return model, runner, f"onnxruntime {runner.prefix.get_providers()[0]}{precision}", lens
    host = host_spec(spec) if isinstance(spec, SimSpec) else spec
    dev = _torch_device(host, budget.target() if budget else None)
    dev.check()
    model = load_model(folder, dev.dtype)
    label = sim_label(spec) if isinstance(spec, SimSpec) else dev.describe()
    return model, TorchRunner(model, dev, max_len, exit_layer=exit_layer), label, None


def _draft_onnx(spec: OrtSpec, folder: Path, onnx_dir: Path) -> Path:
    """The draft's exported (and quantized) ONNX file: from the cache, else exported (in a
    worker process for a large model, `export_worker`), before the target loads."""
    quant = None if spec.quantize == "none" else spec.quantize
    cached = find_cached(weightless_model(folder), onnx_dir, source_identity(folder), quant)
    if cached is not None:
        return cached
    path = export_worker.run("draft", folder, onnx_dir=str(onnx_dir), quantize=quant)["path"]
    return Path(path)


def _draft_runner(spec, folder: Path, max_len: int, onnx_dir: Path, trim: VocabTrim | None = None,
                  budget: ThreadBudget | None = None, onnx: Path | None = None):  # fmt: skip
    """(runner, label, ONNX path) for the draft on its device; an ORT device gets the exported
    draft (`onnx` when it was exported already). With a `trim`, the draft's LM head keeps only
    the trim's K rows (exported under its own cache key) and `TrimmedVocabRunner` restores
    (T, V) logits, -inf outside the kept set."""
    if isinstance(spec, TorchSpec | SimSpec):
        host = host_spec(spec) if isinstance(spec, SimSpec) else spec
        dev = _torch_device(host, budget.draft() if budget else None)
        model = load_model(folder, host.dtype)
        label = sim_label(spec) if isinstance(spec, SimSpec) else dev.describe()
        if trim is None:
            return TorchRunner(model, dev, max_len, name="draft"), label, None
        runner = TorchRunner(with_trimmed_head(model, trim), dev, max_len, name="draft")
        return TrimmedVocabRunner(runner, trim), label, None
    if isinstance(spec, OrtSpec):
        dev = _ort_device(spec, budget, "draft")
        if trim is None:
            path = onnx or _draft_onnx(spec, folder, onnx_dir)
        else:
            model = load_model(folder, "float32")
            quant = None if spec.quantize == "none" else spec.quantize
            path = export_trimmed(model, onnx_dir, source_identity(folder), trim, quant)
            del model
        runner = OrtRunner(path, dev, max_len, name="draft", alias=spec.alias)
        label = f"onnxruntime {runner.session.get_providers()[0]}"
        return (TrimmedVocabRunner(runner, trim) if trim else runner), label, path
    raise DeviceMapError(f"devices.{spec.alias}", f"backend {spec.backend!r} cannot run a draft")


def _draft_trim(k: int, given: VocabTrim | str | Path | None, t_folder: Path, t_tok, t_model,
                cache) -> tuple[VocabTrim, float | None]:  # fmt: skip
    """(VocabTrim, in-sample coverage or None) for the draft's head: `given` (an object or a
    `vocab_trim.json`), else the target's K most frequent own choices over the calibration
    corpus (counted once per target and cached) plus its EOS ids.

    Raises:
        ValueError: `given` does not match K or the target's vocabulary.
    """
    v = load_config(t_folder).vocab_size
    if given is not None:
        trim = given if isinstance(given, VocabTrim) else VocabTrim.load(given)
        if (k and trim.size != k) or trim.vocab_size != v:
            raise ValueError(
                f"draft_trim keeps {trim.size} of {trim.vocab_size} tokens, but the plan asks "
                f"for speculation.draft_vocab_size {k} of the target's {v}; pass a matching "
                "trim or set draft_vocab_size to its size"
            )
        return trim, None
    from mirror_sd.runtime.prompts import eos_token_ids
    from mirror_sd.training.vocab import make_trim, vocab_counts

    counts, source = vocab_counts(t_folder, cache, model=t_model)
    gen_cfg = t_folder / "generation_config.json"
    eos = eos_token_ids(t_tok, json.loads(gen_cfg.read_text()) if gen_cfg.is_file() else None)
    return make_trim(counts, source, k, eos)


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
    """Compile `target` (+ `draft`) into a dual-device `Plan`.

    Args:
        target, draft: a known model name (`mirror-sd models list`) or a local HF folder;
            draft None runs the target alone (the map's draft placement and the devices
            only the draft uses are ignored).
        device_map: a YAML path/text, a dict, a `DeviceMap`, or None for the default
            (target and int8 draft in ONNX Runtime on the CPU, mode auto).
        cache: the model cache folder (default $MIRROR_SD_CACHE or ~/.cache/mirror-sd).
        onnx_dir: where exported draft stages are cached (default <cache>/onnx).
        profile_data: a measured `Profile` to use instead of profiling now.
        draft_trim: the `VocabTrim` (or its JSON file) for the draft's head instead of
            calibrating one for `speculation.draft_vocab_size` (what `load()` passes).
        **speculation: `SpecConfig` fields overriding the map's `speculation:` section.
    Raises:
        DeviceMapError / PlacementError: the map is malformed or does not fit the models.
        TokenizerMismatchError: the draft's tokenizer differs from the target's.
        ProviderUnavailableError: an execution provider is missing here.
    """
    dm = (
        device_map
        if isinstance(device_map, DeviceMap)
        else (load_device_map(device_map) if device_map is not None else default_device_map())
    )
    if draft is None:  # target only: the map's draft entries do not apply
        dm = _without_draft(dm)
    dm = with_absolute_profiles(dm)
    spec = dm.speculation.with_(**speculation)
    try:
        check_source(spec.retrieval)
    except ValueError as e:
        raise DeviceMapError("speculation.retrieval", str(e), dm.source) from None
    mode_asked = spec.mode
    t_folder = zoo.resolve_model(target, cache=cache)
    d_folder = zoo.resolve_model(draft, cache=cache) if draft is not None else None
    t_tok, t_cfg, d_cfg = load_tokenizer(t_folder), load_config(t_folder), None
    if d_folder is not None:
        _check_tokenizers(t_tok, load_tokenizer(d_folder), str(target), str(draft))
        d_cfg = load_config(d_folder)
    heads = exit_head_files(spec, t_folder, cache)  # trained exit heads (none for lm_head)
    if len(heads.layers) == 1:
        spec = spec.with_(exit_layer=heads.layers[0])
    auto = "auto" in (spec.exit_layer, spec.branch_budget, spec.mode)
    exit_layer = (
        spec.exit_layer
        if isinstance(spec.exit_layer, int)
        else (
            heads.layers[len(heads.layers) // 2] if heads.files else max(1, t_cfg.num_layers // 2)
        )
    )
    graph = _graph(t_cfg, d_cfg, exit_layer)
    placement = place(graph, _with_spec(dm, spec))  # validates the map before any heavy work
    # a model whose nodes span devices runs pipelined (pipelined.py); its first device names it
    t_split = spans_devices(placement, "target")
    d_split = d_folder is not None and spans_devices(placement, "draft")
    t_alias = (
        first_alias(placement, "target")
        if t_split
        else _alias_of(dm, placement.assignment, "target")
    )
    d_alias = None
    if d_folder is not None:
        d_alias = (
            first_alias(placement, "draft")
            if d_split
            else _alias_of(dm, placement.assignment, "draft")
        )
    t_spec, d_spec = dm.devices[t_alias], dm.devices[d_alias] if d_alias else None
    budget = ThreadBudget.for_devices(
        t_spec, d_spec, spec.overlap, spec.overlap_target_cores or None
    )
    onnx_root = Path(onnx_dir) if onnx_dir else zoo.cache_dir(cache) / "onnx"
    # sim devices: plan from their profiles (no measuring), run on the host (simulated.py)
    profile_data = profile_data or sim_profile(dm, t_spec, d_spec, t_cfg.num_layers)
    # the torch model of an ORT target is needed after the export only by the logit lens
    # (measured before the sessions load) and by exit heads / vocabulary trims built from it
    keep_model = bool(
        heads.files or spec.draft_vocab_size or draft_trim is not None or spec.exit_vocab_size
    )
    profiling = d_folder is not None and auto and profile_data is None
    lens_ids = t_tok(CALIBRATION_TEXT)["input_ids"] if profiling else None
    d_onnx = None  # an untrimmed ORT draft is exported first: its torch model and quantizer
    # copies are gone before the target loads, so a first compile holds one model at a time
    trimmed = bool(spec.draft_vocab_size or draft_trim is not None)
    if d_folder is not None and not d_split and isinstance(d_spec, OrtSpec) and not trimmed:
        d_onnx = _draft_onnx(d_spec, d_folder, onnx_root)
    check_plan(t_spec, d_spec, keep_model, dm.source)  # what tensor_parallel cannot do yet
    if t_split:
        t_model, t_runner, t_label = pipeline_runner(
            dm, placement, "target", t_folder, spec.max_len, exit_layer, budget.target()
        )
        lens = None
    elif is_tp(t_spec):  # ranks > 0 serve rank 0 inside this call (distributed/target.py)
        t_model, t_runner, t_label, lens = tp_target_runner(
            t_spec, t_folder, exit_layer, spec.max_len, lens_ids, dm.source
        )
    else:
        t_model, t_runner, t_label, lens = _target_runner(
            t_spec, t_folder, exit_layer, spec.max_len, onnx_root, budget, lens_ids, keep_model
        )
    d_runner = d_label = onnx_path = d_trim = d_trim_cov = None
    if d_folder is not None:
        if spec.draft_vocab_size or draft_trim is not None:
            d_trim, d_trim_cov = _draft_trim(
                spec.draft_vocab_size, draft_trim, t_folder, t_tok, t_model, cache
            )
            spec = spec.with_(draft_vocab_size=d_trim.size)
        if d_split:
            if d_trim is not None:
                raise DeviceMapError("speculation.draft_vocab_size", "a draft spread over "
                                     "devices keeps its full head: set draft_vocab_size: 0",
                                     dm.source)  # fmt: skip
            _, d_runner, d_label = pipeline_runner(
                dm, placement, "draft", d_folder, spec.max_len, 0, budget.draft()
            )
        else:
            d_runner, d_label, onnx_path = _draft_runner(
                d_spec, d_folder, spec.max_len, onnx_root, d_trim, budget, d_onnx
            )
    e_trim = None
    if spec.exit_head == "lm_head" and spec.exit_vocab_size:
        e_trim, _ = _draft_trim(spec.exit_vocab_size, None, t_folder, t_tok, t_model, cache)
    choice = prof = None
    if d_runner is not None and auto:
        ids = t_tok(CALIBRATION_TEXT)["input_ids"]
        prof = profile_data or profile(t_runner, d_runner, lens if lens is not None else t_model,
                                       ids, max_block=spec.num_draft_tokens + 1,
                                       description=f"{target} <- {draft}", budget=budget)  # fmt: skip
        if heads.files or e_trim is not None:  # the exit head in use, not the full lens
            probe = build_exit_head(spec, exit_layer, heads, t_model, e_trim)
            t_exit = time_exit_head(probe, spec.num_draft_tokens + 1)
            prof = (
                with_trained_agreement(prof, heads, t_exit)
                if heads.files
                else replace(prof, t_exit_head=t_exit)
            )
        # maximize predicted speedup: a hidden draft with a near-zero hit rate (an early ℓe
        # whose exit head rarely contains the verdict) loses to a later ℓe that hits
        choice = choose(prof, spec, exit_layers=heads.layers or None, prefer_hidden=False)
        spec = choice.spec
        if spec.mode == "auto":  # the cost model's verdict for this machine, kept in the plan
            spec = spec.with_(mode=choice.best_mode)
    elif auto:  # no draft: nothing to tune
        spec = spec.with_(exit_layer=exit_layer, branch_budget=DEFAULT_BUDGET_WITHOUT_PROFILE)
        if spec.mode == "auto":
            spec = spec.with_(mode="autoregressive")
    kept_split = None
    if (
        spec.exit_layer != exit_layer
        and not isinstance(t_runner, TorchRunner | PipelineRunner | TPRunner)
        and spec.mode != "mirror"
    ):  # ℓe matters only to mirror rounds: keep the open split instead of reloading the target
        kept_split = (exit_layer, spec.exit_layer)
        spec = spec.with_(exit_layer=exit_layer)
    if spec.exit_layer != exit_layer:
        if isinstance(t_runner, TorchRunner | PipelineRunner | TPRunner):
            t_runner.exit_layer = spec.exit_layer
        else:  # graphs fix ℓe: splice the chosen split from the per-layer export
            del t_runner  # free the provisional split's sessions before the next load
            release_memory()
            t_model, t_runner, _, _ = _target_runner(
                t_spec, t_folder, spec.exit_layer, spec.max_len, onnx_root, budget,
                keep_model=keep_model,
            )  # fmt: skip
        graph = _graph(t_cfg, d_cfg, spec.exit_layer)
        placement = place(graph, _with_spec(dm, spec))
    exit_head = build_exit_head(spec, spec.exit_layer, heads, t_model, e_trim)
    gen_cfg_file = t_folder / "generation_config.json"
    report = CompileReport(
        target=str(t_folder), draft=str(d_folder) if d_folder else None,
        device_map=_with_spec(dm, spec).to_dict(), graph=graph, placement=placement,
        mode_asked=mode_asked, choice=choice, profile=prof,
        onnx=str(onnx_path) if onnx_path else None,
        draft_placement=getattr(d_runner, "placement", None), draft_trim=d_trim,
        draft_trim_coverage=d_trim_cov, exit_heads=heads, kept_split=kept_split,
    )  # fmt: skip
    return Plan(
        target=t_runner,
        target_device=DeviceSlot(_slot_alias(placement, "target", t_alias), t_label),
        draft=d_runner,
        draft_device=(
            DeviceSlot(_slot_alias(placement, "draft", d_alias), d_label)
            if d_runner is not None
            else None
        ),
        tokenizer=t_tok,
        spec=spec,
        generation_config=json.loads(gen_cfg_file.read_text()) if gen_cfg_file.is_file() else None,
        device_specs=(t_spec, d_spec),
        report=report,
        accept_rate=prof.accept_rate if prof is not None else None,
        exit_head=exit_head,
    )


def _slot_alias(placement, model: str, alias: str) -> str:
    """The name of a model's pipeline: its device alias, or 'dev0+dev1' when spread."""
    return (
        "+".join(model_aliases(placement.assignment, model))
        if spans_devices(placement, model)
        else alias
    )


def _graph(t_cfg, d_cfg, exit_layer: int) -> ModelGraph:
    graphs = [ModelGraph.from_config(t_cfg, "target", exit_layer=exit_layer)]
    if d_cfg is not None:
        graphs.append(ModelGraph.from_config(d_cfg, "draft"))
    return ModelGraph.compose(*graphs)


def _with_spec(dm: DeviceMap, spec: SpecConfig) -> DeviceMap:
    return DeviceMap(dm.devices, dm.placement, spec, dm.source)


def _without_draft(dm: DeviceMap) -> DeviceMap:
    """`dm` without its `draft` / `draft.*` placement keys and the devices only they use."""
    placement = {k: a for k, a in dm.placement.items() if k.split(".")[0] != "draft"}
    used = set(placement.values())
    dropped = {a for k, a in dm.placement.items() if k.split(".")[0] == "draft"} - used
    devices = {a: d for a, d in dm.devices.items() if a not in dropped}
    return DeviceMap(devices, placement, dm.speculation, dm.source)


def quantization_report(
    model: str | Path,
    text: str = CALIBRATION_TEXT,
    cache: str | Path | None = None,
    onnx_dir: str | Path | None = None,
    threads: int = 1,
    quantizations: tuple[str, ...] = ("int8", "int4"),
) -> dict:
    """Export `model` in fp32 and each of `quantizations` (cached) and report each quantized
    model's teacher-forced top-1 agreement with fp32 over `text` (`<q>_top1_agreement`;
    `top1_agreement` is int8's) plus the median step time of each on one token (`<q>_step_ms`).

    This is what quantizing a draft risks: only its acceptance rate, never the output.
    """
    import time

    from mirror_sd.runtime.profiling import teacher_forced_agreement

    bad = [q for q in quantizations if q not in ("int8", "int4")]
    if bad:
        raise ValueError(f"quantizations {bad}: expected int8 and/or int4")
    folder = zoo.resolve_model(model, cache=cache)
    onnx_root = Path(onnx_dir) if onnx_dir else zoo.cache_dir(cache) / "onnx"
    torch_model = load_model(folder, "float32")
    dev = OrtDevice(intra_op_threads=threads, inter_op_threads=1)
    runners = {}
    for q in (None, *quantizations):
        path = export_cached(torch_model, onnx_root, source_identity(folder), quantize=q)
        runners[q or "fp32"] = OrtRunner(path, dev, 4096, name=q or "fp32")
    del torch_model
    ids = load_tokenizer(folder)(text)["input_ids"]
    out: dict[str, Any] = {"model": str(model), "tokens": len(ids)}
    for q in quantizations:
        out[f"{q}_top1_agreement"] = teacher_forced_agreement(runners["fp32"], runners[q], ids)
    if "int8" in quantizations:
        out["top1_agreement"] = out["int8_top1_agreement"]  # the key before int4 existed
    for name, r in runners.items():
        times = []
        for _ in range(5):
            r.rollback(0)
            t0 = time.perf_counter()
            r.forward(
                torch.tensor([[ids[0]]]),
                torch.zeros(1, 1, dtype=torch.long),
                torch.ones(1, 1, 1, dtype=torch.bool),
            )
            times.append(time.perf_counter() - t0)
        out[f"{name}_step_ms"] = round(sorted(times)[2] * 1e3, 1)
    return out
