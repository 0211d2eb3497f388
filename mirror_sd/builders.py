"""The runners compile() builds: devices from map entries, the target and draft runners on
them (exports made or reused; see `export_worker`), vocabulary trims. Also
`quantization_report()` (int8 / int4 against fp32 of one model)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from mirror_sd import export_worker
from mirror_sd.devices.cpu_caps import host_caps
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
from mirror_sd.export_worker import cached_lens, measure_lens
from mirror_sd.graphs import zoo
from mirror_sd.graphs.checkpoint import checkpoint_precision
from mirror_sd.graphs.config import load_config
from mirror_sd.graphs.export import export_cached, find_cached, source_identity
from mirror_sd.graphs.loader import load_model, load_tokenizer, release_memory, weightless_model
from mirror_sd.graphs.quantize import quantize_linears
from mirror_sd.graphs.trimmed_head import export_trimmed, with_trimmed_head
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.partition import DeviceMapError, OrtSpec, SimSpec, TorchSpec
from mirror_sd.partition.precision import (
    AUTO,
    choose_dtype,
    choose_quantize,
    choose_torch_quantize,
    dtype_for_quantized,
)
from mirror_sd.partition.threads import ThreadBudget
from mirror_sd.runtime.profiling import CALIBRATION_TEXT
from mirror_sd.simulated import host_spec, sim_label


def resolve_precision(dm, roles: dict[str, Path | None]) -> tuple[Any, dict[str, str]]:
    """The map with every `quantize: auto` / `dtype: auto` of the devices in `roles` (alias ->
    the model folder it runs) made concrete (`partition.precision`), and role notes for
    `describe()` ({alias: "quantize: auto -> int4 (...)"})."""
    devices, notes = dict(dm.devices), {}
    for alias, folder in roles.items():
        spec = devices.get(alias)
        if folder is None or spec is None:
            continue
        if isinstance(spec, OrtSpec) and spec.quantize == AUTO:
            choice = choose_quantize(checkpoint_precision(folder), host_caps())
            devices[alias] = dataclasses.replace(spec, quantize=choice.value)
        elif isinstance(spec, TorchSpec) and AUTO in (spec.dtype, spec.quantize):
            caps = host_caps() if spec.device == "cpu" else None
            checkpoint, said = checkpoint_precision(folder), []
            if spec.quantize == AUTO:
                choice = choose_torch_quantize(checkpoint, spec.device, caps)
                spec = dataclasses.replace(spec, quantize=choice.value)
                said.append(choice.describe())
            if spec.dtype == AUTO:
                choice = (
                    dtype_for_quantized(spec.quantize, caps)
                    if spec.quantize != "none"
                    else choose_dtype(checkpoint, spec.device, caps)
                )
                spec = dataclasses.replace(spec, dtype=choice.value)
                said.append(choice.describe())
            devices[alias] = spec
            notes[alias] = "; ".join(said)
            continue
        else:
            continue
        notes[alias] = choice.describe()
    return dataclasses.replace(dm, devices=devices), notes


def with_quantize(model, quantize: str):
    """`model` with weight-only int8 / int4 linears (`graphs.quantize`) unless `quantize` is
    "none"; the swap happens in place and the model is returned."""
    if quantize != "none":
        quantize_linears(model, quantize)
    return model


def _torch_label(dev: TorchDevice, spec) -> str:
    q = getattr(spec, "quantize", "none")
    return dev.describe() + (f" {q} weights" if q != "none" else "")


def torch_device(spec, threads: int | None = None) -> TorchDevice:
    """The torch device of a map entry; `threads` is the thread budget's count when alone."""
    if not isinstance(spec, TorchSpec):
        raise DeviceMapError(
            f"devices.{spec.alias}",
            f"the target needs a torch device in this version, got backend {spec.backend!r}",
        )
    return TorchDevice(spec.device, threads or spec.threads, spec.dtype)


def ort_device(
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


def target_runner(spec, folder: Path, exit_layer: int, max_len: int, onnx_root: Path,
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
            graphs, n_layers, width, exit_layer, max_len, ort_device(spec, budget, "target"),
            alias=spec.alias, quantize=quant,
        )  # fmt: skip
        precision = f" {spec.quantize} weights" if spec.quantize != "none" else ""
        return model, runner, f"onnxruntime {runner.prefix.get_providers()[0]}{precision}", lens
    host = host_spec(spec) if isinstance(spec, SimSpec) else spec
    dev = torch_device(host, budget.target() if budget else None)
    dev.check()
    model = with_quantize(load_model(folder, dev.dtype), getattr(host, "quantize", "none"))
    label = sim_label(spec) if isinstance(spec, SimSpec) else _torch_label(dev, host)
    return model, TorchRunner(model, dev, max_len, exit_layer=exit_layer), label, None


def draft_onnx(spec: OrtSpec, folder: Path, onnx_dir: Path) -> Path:
    """The draft's exported (and quantized) ONNX file: from the cache, else exported (in a
    worker process for a large model, `export_worker`), before the target loads."""
    quant = None if spec.quantize == "none" else spec.quantize
    cached = find_cached(weightless_model(folder), onnx_dir, source_identity(folder), quant)
    if cached is not None:
        return cached
    path = export_worker.run("draft", folder, onnx_dir=str(onnx_dir), quantize=quant)["path"]
    return Path(path)


def draft_runner(spec, folder: Path, max_len: int, onnx_dir: Path, trim: VocabTrim | None = None,
                  budget: ThreadBudget | None = None, onnx: Path | None = None):  # fmt: skip
    """(runner, label, ONNX path) for the draft on its device; an ORT device gets the exported
    draft (`onnx` when it was exported already). With a `trim`, the draft's LM head keeps only
    the trim's K rows (exported under its own cache key) and `TrimmedVocabRunner` restores
    (T, V) logits, -inf outside the kept set."""
    if isinstance(spec, TorchSpec | SimSpec):
        host = host_spec(spec) if isinstance(spec, SimSpec) else spec
        dev = torch_device(host, budget.draft() if budget else None)
        model = with_quantize(load_model(folder, host.dtype), getattr(host, "quantize", "none"))
        label = sim_label(spec) if isinstance(spec, SimSpec) else _torch_label(dev, host)
        if trim is None:
            return TorchRunner(model, dev, max_len, name="draft"), label, None
        runner = TorchRunner(with_trimmed_head(model, trim), dev, max_len, name="draft")
        return TrimmedVocabRunner(runner, trim), label, None
    if isinstance(spec, OrtSpec):
        dev = ort_device(spec, budget, "draft")
        if trim is None:
            path = onnx or draft_onnx(spec, folder, onnx_dir)
        else:
            model = load_model(folder, "float32")
            quant = None if spec.quantize == "none" else spec.quantize
            path = export_trimmed(model, onnx_dir, source_identity(folder), trim, quant)
            del model
        runner = OrtRunner(path, dev, max_len, name="draft", alias=spec.alias)
        label = f"onnxruntime {runner.session.get_providers()[0]}"
        return (TrimmedVocabRunner(runner, trim) if trim else runner), label, path
    raise DeviceMapError(f"devices.{spec.alias}", f"backend {spec.backend!r} cannot run a draft")


def draft_trim(k: int, given: VocabTrim | str | Path | None, t_folder: Path, t_tok, t_model,
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
