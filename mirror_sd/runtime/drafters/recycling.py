"""Token Recycling: propose from the target's own verification logits, kept per token.

Every verification forward scores each block row; the target's top-k tokens after a row
are candidates the target itself found likely after that row's token. Token Recycling
(Luo et al. 2024) keeps, for every token, the top-k successors from the latest row that
carried it (an adjacency table, V x k at most), and drafts by walking it from the last
committed token: the first successor of the last token, then of that one, ... Training-free
and model-free: the draft costs a few dict lookups, and the table lives as long as the plan
(every generation teaches the next ones).

Here the walk is a chain along each token's first successor (the paper verifies a static
tree of successors; trees are `speculation.tree_siblings`' territory, docs/algorithm.md,
*Token trees*). `observe(rows, logits)` is called by the round loop after each verification;
`match_len` of a proposal is the walk's length (each step is one recycled successor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mirror_sd.runtime.drafters.base import Proposal, check_max_tokens
from mirror_sd.runtime.drafters.sources import SourceSettings, register

SUCCESSORS = 8  # top-k kept per token (the paper's adjacency width)


class TokenRecycling:
    """A plan-level successor table plus one sequence's last committed token."""

    def __init__(self, k: int = SUCCESSORS, name: str = "recycle") -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.name = k, name
        self.table: dict[int, list[int]] = {}  # shared by every fork of the plan's source
        self._last: int | None = None

    def reset(self, context: Sequence[int]) -> None:
        """Start a sequence (the table is kept: it is the plan's)."""
        self._last = int(context[-1]) if len(context) else None

    def extend(self, tokens: Sequence[int]) -> None:
        """The sequence's last committed token moves on."""
        if len(tokens):
            self._last = int(tokens[-1])

    def observe(self, rows: Sequence[int], logits: torch.Tensor) -> None:
        """A verification block's tokens and the target's logits (T, V) after each: each
        token's successors become that row's top-k (the newest row wins)."""
        top = logits.float().topk(min(self.k, logits.shape[-1]), dim=-1).indices.tolist()
        for tok, succ in zip(rows, top, strict=False):
            self.table[int(tok)] = succ

    def propose(self, max_tokens: int) -> Proposal:
        """The walk along first successors from the last committed token (at most
        `max_tokens`; shorter where a token has no entry yet)."""
        check_max_tokens(max_tokens)
        tokens, tok = [], self._last
        while len(tokens) < max_tokens and tok is not None and tok in self.table:
            tok = self.table[tok][0]
            tokens.append(tok)
        return (
            Proposal(tuple(tokens), len(tokens), self.name) if tokens else Proposal.empty(self.name)
        )


@register("recycle", "Token Recycling: successors from the target's own verification logits")
def _recycle(settings: SourceSettings) -> TokenRecycling:
    return TokenRecycling()
