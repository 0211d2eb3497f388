"""Drafts read off the target's own hidden state: Amphista heads as a proposer.

After a verification the target has computed, for every row of the block, its hidden state
entering the exit layer ℓe (a `SplitRunner`'s prefix output). The last accepted row's is
the state from which the target chose its correction token; the heads (`graphs.amphista`)
read it and guess the K tokens after that correction. Those guesses are the sequence's next
block, verified by the next round like any draft, so no head can change the output; they
cost a few small matmuls on the host instead of γ draft-model steps.

A block is valid for the round right after the one that computed it: the scheduler takes
each sequence's block (`take`) when it proposes and stores new ones (`after`) when it has
verified. With `siblings` > 0 a greedy sequence also gets each head's next-best tokens as
sibling leaves, which the target verifies as a token tree (`TokenTree.with_siblings`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from mirror_sd.runtime.draft_engine import Draft, depth_siblings

SOURCE = "amphista"  # the RoundLog source of a head block


class Heads(Protocol):
    """What `graphs.amphista.AmphistaHeads` offers the round loop."""

    layer: int  # ℓ: the heads read the hidden state entering this target layer

    def propose(self, hidden: torch.Tensor, top_k: int = 1) -> tuple[list[int], list[list[int]]]:
        """hidden (D,) -> each head's top-1 token and its next `top_k - 1` tokens."""
        ...


class HeadDrafts:
    """Per sequence, the block the heads proposed in the last round it was verified in."""

    def __init__(self, heads: Heads):
        self.heads = heads
        self._blocks: dict[int, Draft] = {}

    def after(self, seq: int, hidden_row: torch.Tensor, gamma: int,
              siblings: int | Sequence[int] = ()) -> None:  # fmt: skip
        """Store sequence `seq`'s next block from the hidden state of its last accepted row;
        `siblings`: leaves per depth (a tree; an int: the same at every depth)."""
        most = max(depth_siblings(siblings, j) for j in range(gamma))
        tokens, alts = self.heads.propose(hidden_row, top_k=1 + most)
        tokens = tokens[:gamma]
        per_depth = [a[: depth_siblings(siblings, j)] for j, a in enumerate(alts[:gamma])]
        self._blocks[seq] = Draft(tokens, None, source=SOURCE, alts=per_depth if most else None)

    def take(self, seq: int, gamma: int) -> Draft | None:
        """Sequence `seq`'s block (at most γ tokens), once; None when the heads have none."""
        block = self._blocks.pop(seq, None)
        if block is None or not block.tokens:
            return None
        alts = block.alts[:gamma] if block.alts else None
        return Draft(block.tokens[:gamma], None, source=block.source, alts=alts)

    def drop(self, seq: int) -> None:
        self._blocks.pop(seq, None)
