"""The runners compile() builds: the target and draft runners on their map entries' devices,
each made by the entry's backend (`mirror_sd/backends/`: exports made or reused through
`export_worker`), `auto` precisions made concrete, vocabulary trims. Also
`quantization_report()` (int8 / int4 against fp32 of one model)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from mirror_sd.backends.registry import backend_for
from mirror_sd.devices.cpu_caps import host_caps
from mirror_sd.devices.ort_core import OrtDevice
from mirror_sd.devices.ort_device import OrtRunner
from mirror_sd.graphs import zoo
from mirror_sd.graphs.checkpoint import checkpoint_precision
from mirror_sd.graphs.config import load_config
from mirror_sd.graphs.export import export_cached, source_identity
from mirror_sd.graphs.loader import load_model, load_tokenizer
from mirror_sd.graphs.streams import StreamTable
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.partition.precision import AUTO
from mirror_sd.partition.threads import ThreadBudget
from mirror_sd.runtime.profiling import CALIBRATION_TEXT


def resolve_precision(dm, roles: dict[str, tuple[Path | None, str]]) -> tuple[Any, dict[str, str]]:
    """The map with every `quantize: auto` / `dtype: auto` of the devices in `roles` (alias ->
    (the model folder it runs, "target" | "draft")) made concrete by its backend
    (`partition.precision`: the checkpoint's precision, the host CPU's kernels, the role), and
    notes for `describe()` ({alias: "quantize: auto -> int4 (...)"})."""
    devices, notes = dict(dm.devices), {}
    for alias, (folder, role) in roles.items():
        spec = devices.get(alias)
        if folder is None or spec is None or AUTO not in vars(spec).values():
            continue  # nothing `auto`: the checkpoint is not read
        backend = backend_for(spec)
        devices[alias], note = backend.resolve_precision(
            spec, checkpoint_precision(folder), host_caps(), role
        )
        if note is not None:
            notes[alias] = note
    return dataclasses.replace(dm, devices=devices), notes


def target_runner(spec, folder: Path, exit_layer: int, max_len: int, onnx_root: Path,
                   budget: ThreadBudget | None = None, lens_ids: list[int] | None = None,
                   keep_model: bool = True):  # fmt: skip
    """(torch model or None, runner, label, lens agreement or None) for the target, built by
    the backend of its device (`backends`).

    An ORT target's graphs are spliced from its per-layer export (`graphs.layered`); with
    `lens_ids` the logit-lens agreement per ℓe candidate comes along (kept beside the export,
    `export_worker.measure_lens`). Without `keep_model` this process never loads the target's
    torch model: a missing export or lens is made by `export_worker` (a worker process for a
    large model, whose memory leaves with it), and None is returned for the model. With
    `keep_model` (exit heads, vocabulary trims) the model is loaded here and returned.

    Raises:
        TypeError: no backend runs the spec's type.
    """
    return backend_for(spec).target_runner(
        spec, folder, exit_layer, max_len, onnx_root, budget, lens_ids, keep_model
    )


def draft_runner(spec, folder: Path, max_len: int, onnx_dir: Path, trim: VocabTrim | None = None,
                  budget: ThreadBudget | None = None, onnx: Path | None = None,
                  streams: StreamTable | None = None):  # fmt: skip
    """(runner, label, ONNX path or None) for the draft on its device, built by its backend;
    an ORT device gets the exported draft (`onnx` when it was exported already). With a
    `trim`, the draft's LM head keeps only the trim's K rows (exported under its own cache key)
    and `TrimmedVocabRunner` restores (T, V) logits, -inf outside the kept set. With
    `streams`, the draft's embedding also reads the stream rows (speculative streaming).

    Raises:
        TypeError: no backend runs the spec's type.
    """
    return backend_for(spec).draft_runner(spec, folder, max_len, onnx_dir, trim, budget, onnx,
                                          streams)  # fmt: skip


def draft_streams(setting: str, d_folder: Path, t_folder: Path, d_cfg, cache) -> StreamTable:
    """The draft's stream rows for `speculation.draft_streams` ("trained": the table `mirror-sd
    train streams` cached for this draft and target; else a table's folder), checked against
    the draft's vocabulary and width.

    Raises:
        FileNotFoundError: "trained" but none is cached, or no table in the folder given.
        ValueError: the table was made for another draft.
    """
    if setting == "trained":
        from mirror_sd.training.streams import trained_streams

        found = trained_streams(cache, d_folder, t_folder)
        if found is None:
            raise FileNotFoundError(
                f"speculation.draft_streams: trained, but no stream rows are cached for the "
                f"draft {d_folder.name} with the target {t_folder.name}: run `mirror-sd train "
                f"streams {t_folder} --draft {d_folder}` first, or set draft_streams: none"
            )
        setting = str(found)
    table = StreamTable.load(Path(setting).expanduser())
    table.check(d_cfg.vocab_size, d_cfg.hidden_size)
    return table


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
