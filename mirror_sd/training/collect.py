"""The target's own behaviour over a corpus: hidden states after chosen layers and the
target's next-token choice (argmax of its final logits) at every position.

This is what exit heads, the Kangaroo adapter and VocabTrim are fitted to: the labels are
the tokens the target itself would emit (teacher-forced), not the corpus text.
Collections are cached on disk keyed by the model's and corpus's identities.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mirror_sd.graphs.masks import causal_mask
from mirror_sd.graphs.model import CausalLM
from mirror_sd.progress import bar as progress_bar  # `progress` is the argument's name here
from mirror_sd.training.corpus import Corpus

COLLECT_VERSION = 1


@dataclass
class Collected:
    """Per position of every chunk: hidden (after layer ℓ) and the target's argmax label."""

    ids: torch.Tensor  # (C, T) int64: the corpus tokens
    labels: torch.Tensor  # (C, T) int64: the target's argmax after each prefix
    hidden: dict[int, torch.Tensor]  # ℓ -> (C, T, D) float16: hidden state after layer ℓ - 1
    final_top: torch.Tensor  # (C, T, k) int64: the target's top-k tokens (soft-label support)

    def counts(self, vocab_size: int) -> torch.Tensor:
        """How often the target chose each token (VocabTrim's calibration counts)."""
        return torch.bincount(self.labels.flatten(), minlength=vocab_size)


@torch.inference_mode()
def collect(
    model: CausalLM, chunks: Sequence[Sequence[int]], layers: Sequence[int], top_k: int = 8,
    progress: bool | None = None,
) -> Collected:  # fmt: skip
    """Run `model` teacher-forced over each chunk, keeping the hidden state entering layer ℓ
    (i.e. after layers [0, ℓ)) for each ℓ in `layers` and the final argmax / top-k. A bar
    over the chunks on stderr with `progress` (None: when `mirror_sd.progress` shows them)."""
    n = model.num_layers
    bad = [x for x in layers if not 0 < x <= n]
    if bad:
        raise ValueError(f"layers {bad} outside [1, {n}]")
    t = len(chunks[0])
    if any(len(c) != t for c in chunks):
        raise ValueError("all chunks must have the same length")
    hidden = {
        x: torch.empty(len(chunks), t, model.config.hidden_size, dtype=torch.float16)
        for x in layers
    }
    labels = torch.empty(len(chunks), t, dtype=torch.long)
    top = torch.empty(len(chunks), t, top_k, dtype=torch.long)
    pos = torch.arange(t).unsqueeze(0)
    mask = causal_mask(0, t)
    bar = progress_bar(chunks, desc="target over corpus", unit="chunk", show=progress)
    for c, chunk in enumerate(bar):
        cache = model.new_cache(t)
        x = model.embed(torch.tensor([list(chunk)]))
        for i in range(n):
            x = model.run_layers(i, i + 1, x, pos, mask, cache)
            if i + 1 in hidden:
                hidden[i + 1][c] = x[0].to(torch.float16)
        logits = model.head(x)[0].float()
        top[c] = logits.topk(top_k, dim=-1).indices
        labels[c] = top[c, :, 0]
    return Collected(torch.tensor([list(c) for c in chunks]), labels, hidden, top)


def collect_cached(
    model: CausalLM, model_identity: str, corpus: Corpus, layers: Sequence[int], folder: Path,
    progress: bool | None = None,
) -> Collected:  # fmt: skip
    """`collect`, reusing a saved collection of the same (model, corpus) whose layers include
    `layers` (a collection of all layers serves every later request)."""
    key = hashlib.sha256(
        f"{COLLECT_VERSION}|{model_identity}|{corpus.identity}".encode()
    ).hexdigest()[:16]
    folder = Path(folder)
    for path in sorted(folder.glob(f"collect-{key}-*.pt")):
        have = {int(x) for x in path.stem.split("-")[2].split("_") if x}
        if set(layers) <= have:
            d = torch.load(path, weights_only=True, mmap=True)
            hidden = {x: d["hidden"][str(x)] for x in layers}
            return Collected(d["ids"], d["labels"], hidden, d["final_top"])
    col = collect(model, corpus.chunks, layers, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"collect-{key}-{'_'.join(map(str, sorted(layers)))}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({"ids": col.ids, "labels": col.labels, "final_top": col.final_top,
                "hidden": {str(k): v for k, v in col.hidden.items()}}, tmp)  # fmt: skip
    tmp.replace(path)
    return col
