"""VocabTrim: a reduced output vocabulary for heads that only *propose* tokens.

A draft's LM head and the target's exit head only affect which tokens are proposed (the
acceptance rate and the hit rate), never the output: the target verifies with its full head.
So their LM heads can keep just the K tokens the target emits most often, which cuts the
largest matmul of a small model (V x D; V = 151,936 for Qwen2.5).

`VocabTrim` holds the kept token ids (most frequent first) and where the counts came from;
`expand` scatters trimmed logits (T, K) back to the full vocabulary with -inf elsewhere, so
everything downstream (argmax, softmax, verification) sees an ordinary (T, V) distribution
with zero mass outside the kept set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch


@dataclass(frozen=True)
class VocabTrim:
    keep: tuple[int, ...]  # kept token ids, most frequent first
    vocab_size: int  # the full vocabulary V
    source: str = ""  # how the counts were made (model, corpus identity)

    def __post_init__(self) -> None:
        if not self.keep or len(set(self.keep)) != len(self.keep):
            raise ValueError("VocabTrim.keep must be a non-empty list of distinct token ids")
        if min(self.keep) < 0 or max(self.keep) >= self.vocab_size:
            raise ValueError(f"VocabTrim.keep has ids outside [0, {self.vocab_size})")

    @property
    def size(self) -> int:
        return len(self.keep)

    @classmethod
    def from_counts(
        cls, counts: torch.Tensor, k: int, source: str = "", always: tuple[int, ...] = ()
    ) -> VocabTrim:
        """The `k` most frequent ids of `counts` (V,), ties by id; `always` ids (e.g. EOS) are
        kept regardless, replacing the least frequent ones."""
        v = counts.numel()
        if not 0 < k <= v:
            raise ValueError(f"VocabTrim size {k} outside [1, {v}]")
        order = sorted(range(v), key=lambda i: (-int(counts[i]), i))
        forced = [i for i in always if 0 <= i < v]
        rest = [i for i in order if i not in set(forced)]
        keep = rest[: k - len(forced)] + forced
        return cls(tuple(keep), v, source)

    def ids(self) -> torch.Tensor:
        """The kept ids as a (K,) int64 tensor (cached: shared, do not modify it)."""
        return self._ids

    @cached_property
    def _ids(self) -> torch.Tensor:
        # built once: converting a 32K-id tuple takes ~5 ms, longer than a trimmed head saves
        # per draft step if it were rebuilt on every `expand`
        return torch.tensor(self.keep, dtype=torch.long)

    def trim(self, weight: torch.Tensor) -> torch.Tensor:
        """The kept rows of a (V, D) LM-head weight, in `keep` order."""
        return weight.detach()[self.ids()].clone()

    def expand(self, logits: torch.Tensor) -> torch.Tensor:
        """(T, K) logits over the kept ids -> (T, V) with -inf outside them."""
        out = torch.full((logits.shape[0], self.vocab_size), float("-inf"), dtype=logits.dtype)
        return out.index_copy_(1, self._ids, logits)

    def coverage(self, counts: torch.Tensor) -> float:
        """Fraction of the counted target tokens that fall inside the kept set."""
        total = float(counts.sum())
        return float(counts[self.ids()].sum()) / total if total else 0.0

    # --- files ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"vocab_size": self.vocab_size, "source": self.source, "keep": list(self.keep)}
        path.write_text(json.dumps(doc))
        return path

    @classmethod
    def load(cls, path: str | Path) -> VocabTrim:
        doc = json.loads(Path(path).read_text())
        try:
            return cls(tuple(doc["keep"]), int(doc["vocab_size"]), str(doc.get("source", "")))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a VocabTrim file ({exc})") from exc
