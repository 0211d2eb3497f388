"""What a VocabTrim of K tokens buys and costs a draft, measured: per K, the draft's ONNX
Runtime step time (1 and 5 rows after a context) and its teacher-forced top-1 agreement
with the *target's* argmax on held-out stdlib text (another corpus seed; never Spec-Bench).

Unlike the rest of `training` this module runs models on a device (ONNX Runtime): it is
imported only by `mirror-sd calibrate vocab --report`.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mirror_sd import progress as progress_switch
from mirror_sd.devices.ort_core import OrtDevice
from mirror_sd.devices.ort_device import OrtRunner
from mirror_sd.devices.trimmed import TrimmedVocabRunner
from mirror_sd.graphs import zoo
from mirror_sd.graphs.export import export_cached, source_identity
from mirror_sd.graphs.loader import load_model, load_tokenizer
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.graphs.trimmed_head import export_trimmed
from mirror_sd.runtime.profiling import time_rows
from mirror_sd.runtime.prompts import eos_token_ids
from mirror_sd.training.vocab import (
    DEFAULT_CHUNK_LEN,
    DEFAULT_CHUNKS,
    REPORT_KS,
    make_trim,
    target_choices,
    vocab_counts,
)

HELDOUT_SEED_OFFSET = 1000  # held-out corpus seed = calibration seed + this


def vocab_trim_report(
    target: str | Path, draft: str | Path, ks: Sequence[int] = REPORT_KS, *,
    cache: str | Path | None = None, onnx_dir: str | Path | None = None,
    quantize: str = "int8", n_chunks: int = DEFAULT_CHUNKS, chunk_len: int = DEFAULT_CHUNK_LEN,
    seed: int = 0, heldout_chunks: int = 4, threads: int = 1, context: int = 128, reps: int = 5,
    progress: bool | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Measure `draft` with its head trimmed to each K of `ks` (0 = full vocabulary).

    The trims are the ones `compile()` would build (the target's default cached counts plus
    its EOS ids). Held-out chunks identical to a calibration chunk are dropped, so coverage
    and agreement are out of sample. Returns a JSON-able dict; `format_report` prints it.
    """
    progress = progress_switch.wanted(progress)
    t_folder = zoo.resolve_model(target, cache=cache)
    d_folder = zoo.resolve_model(draft, cache=cache)
    counts, source = vocab_counts(t_folder, cache, n_chunks, chunk_len, seed, progress)
    _, calib = target_choices(t_folder, cache, n_chunks, chunk_len, seed, progress)
    labels, held = target_choices(t_folder, cache, heldout_chunks, chunk_len,
                                  seed + HELDOUT_SEED_OFFSET, progress)  # fmt: skip
    seen = {tuple(c) for c in calib.chunks}
    rows = [i for i, c in enumerate(held.chunks) if tuple(c) not in seen]
    if not rows:
        raise ValueError("every held-out chunk is also a calibration chunk; change --seed")
    ids = torch.tensor([held.chunks[i] for i in rows])  # (C, T)
    labels = labels[rows]  # (C, T): the target's argmax after each prefix
    gen_cfg = t_folder / "generation_config.json"
    eos = eos_token_ids(load_tokenizer(t_folder),
                        json.loads(gen_cfg.read_text()) if gen_cfg.is_file() else None)  # fmt: skip
    onnx_root = Path(onnx_dir) if onnx_dir else zoo.cache_dir(cache) / "onnx"
    device = OrtDevice(intra_op_threads=threads, inter_op_threads=1)
    model = load_model(d_folder, "float32")
    quant = None if quantize == "none" else quantize
    out_rows = []
    for k in ks:
        trim = None if k <= 0 or k >= counts.numel() else make_trim(counts, source, k, eos)[0]
        if trim is None:
            path = export_cached(model, onnx_root, source_identity(d_folder), quantize=quant)
        else:
            path = export_trimmed(model, onnx_root, source_identity(d_folder), trim, quant)
        runner = OrtRunner(path, device, max(chunk_len, context + 5), name=f"draft K={k}")
        r = TrimmedVocabRunner(runner, trim) if trim else runner
        kept = trim.ids() if trim else torch.arange(counts.numel())
        out_rows.append({
            "k": trim.size if trim else counts.numel(),
            "coverage_calibration": trim.coverage(counts) if trim else 1.0,
            "coverage_heldout": float(torch.isin(labels, kept).float().mean()),
            "step_ms_1": round(time_rows(r, context, 1, reps) * 1e3, 2),
            "step_ms_5": round(time_rows(r, context, 5, reps) * 1e3, 2),
            "agreement": _agreement(r, ids, labels),
            "onnx": str(path),
        })  # fmt: skip
        del r, runner
        gc.collect()  # one draft session in memory at a time
    return {
        "target": str(t_folder), "draft": str(d_folder), "quantize": quantize,
        "threads": threads, "context": context, "calibration": source,
        "heldout": held.description, "heldout_tokens": int(labels.numel()), "rows": out_rows,
    }  # fmt: skip


def _agreement(runner, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of positions where the draft's argmax (teacher-forced) is the target's."""
    hits = 0
    t = ids.shape[1]
    pos, mask = torch.arange(t).unsqueeze(0), causal_mask(0, t)
    for c in range(ids.shape[0]):
        runner.rollback(0)
        hits += int((runner.forward(ids[c : c + 1], pos, mask).argmax(-1) == labels[c]).sum())
    runner.rollback(0)
    return hits / labels.numel()


def format_report(report: dict[str, Any]) -> str:
    """A markdown table: K | coverage | step ms (1 row, 5 rows) | agreement with the target."""
    lines = [
        f"draft {Path(report['draft']).name} ({report['quantize']}, ONNX Runtime CPU, "
        f"{report['threads']} thread(s), context {report['context']}) vs target "
        f"{Path(report['target']).name}; held-out: {report['heldout_tokens']} tokens",
        "",
        "| K | coverage (calib.) | coverage (held-out) | step ms, 1 row | step ms, 5 rows "
        "| top-1 agreement (held-out) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['k']} | {r['coverage_calibration']:.2%} | {r['coverage_heldout']:.2%} | "
            f"{r['step_ms_1']:.1f} | {r['step_ms_5']:.1f} | {r['agreement']:.2%} |"
        )
    return "\n".join(lines)
