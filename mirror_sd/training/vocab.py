"""VocabTrim calibration: which tokens does the target itself emit, and how often?

`vocab_counts` runs the target teacher-forced over the offline stdlib corpus (never
Spec-Bench) and counts its argmax choices; a draft head (or the exit head) that keeps the
K most frequent of them proposes what the target would say most of the time. The target's
choices are cached on disk under `<cache>/vocab/`, keyed by the target's weights
(`source_identity`) and the corpus identity, so a plan compiles without recalibrating.

Tokens the target never chose in the corpus tie at zero and are ranked by id
(`VocabTrim.from_counts`): in a BPE vocabulary earlier ids are earlier merges, i.e. more
frequent in the tokenizer's own (broad) training data, a sensible prior for the tail.

`mirror-sd calibrate vocab TARGET` (training/cli.py) prints the in-sample coverage of
several K; with `--report DRAFT` it also measures, per K, the draft's step time and its
agreement with the target on held-out text (`training.vocab_report`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from mirror_sd import progress as progress_switch
from mirror_sd.graphs import zoo
from mirror_sd.graphs.config import load_config
from mirror_sd.graphs.export import source_identity
from mirror_sd.graphs.loader import load_model, load_tokenizer
from mirror_sd.graphs.model import CausalLM
from mirror_sd.graphs.vocab_trim import VocabTrim
from mirror_sd.training.collect import collect
from mirror_sd.training.corpus import Corpus, build_corpus

VOCAB_VERSION = 1  # bump when what is counted changes
# 8 x 512 tokens: ~2.5 min for the 1.5B target in torch fp32 on one 2-core CPU (~17 s a chunk)
DEFAULT_CHUNKS = 8
DEFAULT_CHUNK_LEN = 512
REPORT_KS = (8192, 16384, 32768, 0)  # 0 = the full vocabulary


def target_choices(
    target: str | Path, cache: str | Path | None = None, n_chunks: int = DEFAULT_CHUNKS,
    chunk_len: int = DEFAULT_CHUNK_LEN, seed: int = 0, progress: bool | None = None,
    model: CausalLM | None = None,
) -> tuple[torch.Tensor, Corpus]:  # fmt: skip
    """(labels (C, T) int64, corpus): the target's argmax after every prefix of every corpus
    chunk, from the on-disk cache or computed (and cached) now.

    `model` is the target already loaded (used only on a cache miss, and only when it is a
    float32 model on the CPU; otherwise the target is loaded in float32 for the pass).
    """
    progress = progress_switch.wanted(progress)
    folder = zoo.resolve_model(target, cache=cache)
    corpus = build_corpus(load_tokenizer(folder), n_chunks, chunk_len, seed)
    blob = json.dumps([VOCAB_VERSION, source_identity(folder), corpus.identity], sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    path = zoo.cache_dir(cache) / "vocab" / f"labels-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)["labels"], corpus
    if not _cpu_fp32(model):
        model = load_model(folder, "float32")
    labels = collect(model, corpus.chunks, [], top_k=1, progress=progress).labels
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save({"labels": labels, "target": str(folder), "corpus": corpus.description,
                "corpus_identity": corpus.identity}, tmp)  # fmt: skip
    tmp.replace(path)  # atomic: a crash never leaves a half file a later call would trust
    return labels, corpus


def _cpu_fp32(model: CausalLM | None) -> bool:
    if model is None:
        return False
    w = model.lm_head.weight
    return w.device.type == "cpu" and w.dtype == torch.float32


def vocab_counts(
    target: str | Path, cache: str | Path | None = None, n_chunks: int = DEFAULT_CHUNKS,
    chunk_len: int = DEFAULT_CHUNK_LEN, seed: int = 0, progress: bool | None = None,
    model: CausalLM | None = None,
) -> tuple[torch.Tensor, str]:  # fmt: skip
    """(counts (V,) int64, source): how often the target chose each token, teacher-forced over
    `n_chunks` x `chunk_len` tokens of the stdlib corpus drawn with `seed` (cached on disk).

    V is the target's head size (config `vocab_size`, which may exceed the tokenizer's
    length). `source` says which target and which corpus, for `VocabTrim.source`.
    """
    folder = zoo.resolve_model(target, cache=cache)
    labels, corpus = target_choices(folder, cache, n_chunks, chunk_len, seed, progress, model)
    v = load_config(folder).vocab_size
    counts = torch.bincount(labels.flatten(), minlength=v)
    return counts, f"{folder.name}: argmax over {corpus.description} [corpus {corpus.identity}]"


def make_trim(
    counts: torch.Tensor, source: str, k: int, always: Sequence[int] = ()
) -> tuple[VocabTrim, float]:
    """(the VocabTrim keeping the K most counted tokens plus `always` (e.g. EOS: a draft that
    cannot propose the end never lets a round end early), its in-sample coverage).

    Raises:
        ValueError: K is not in [1, V].
    """
    if not 0 < k <= counts.numel():
        raise ValueError(
            f"vocab_size {k} is outside [1, {counts.numel()}] (the target's vocabulary); "
            "use 0 for the full vocabulary"
        )
    trim = VocabTrim.from_counts(counts, k, source, always=tuple(sorted(set(always))))
    return trim, trim.coverage(counts)


def save_counts(path: str | Path, counts: torch.Tensor, source: str) -> Path:
    """Counts as sparse JSON: {"vocab_size", "source", "total", "counts": {id: count}}."""
    nz = counts.nonzero().flatten().tolist()
    doc = {"vocab_size": counts.numel(), "source": source, "total": int(counts.sum()),
           "counts": {str(i): int(counts[i]) for i in nz}}  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def load_counts(path: str | Path) -> tuple[torch.Tensor, str]:
    """(counts (V,), source) from `save_counts`' file."""
    doc = json.loads(Path(path).read_text())
    try:
        counts = torch.zeros(int(doc["vocab_size"]), dtype=torch.long)
        for i, c in doc["counts"].items():
            counts[int(i)] = int(c)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"{path}: not a counts file written by save_counts ({exc})") from exc
    return counts, str(doc.get("source", ""))


def coverage_table(counts: torch.Tensor, ks: Sequence[int]) -> list[tuple[int, float]]:
    """(K, fraction of the counted tokens inside the top-K) for each K (0 = the full V)."""
    ranked = counts.sort(descending=True, stable=True).values.cumsum(0)
    total = max(1, int(counts.sum()))
    out = []
    for k in ks:
        k = counts.numel() if k <= 0 else min(k, counts.numel())
        out.append((k, float(ranked[k - 1]) / total))
    return out
