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
        return self._walk([], self._last, max_tokens)

    def _walk(self, tokens: list[int], tok: int | None, max_tokens: int) -> Proposal:
        """`tokens` extended along first successors from `tok`, up to `max_tokens`."""
        while len(tokens) < max_tokens and tok is not None and tok in self.table:
            tok = self.table[tok][0]
            tokens.append(tok)
        return (
            Proposal(tuple(tokens), len(tokens), self.name) if tokens else Proposal.empty(self.name)
        )


@register("recycle", "Token Recycling: successors from the target's own verification logits")
def _recycle(settings: SourceSettings) -> TokenRecycling:
    return TokenRecycling()


class JacobiGuesses(TokenRecycling):
    """Jacobi iterates, retrieval-augmented (the training-free part of TR-Jacobi, MSN's
    decoding): after a verification that rejected d_{a+1}, the target's argmaxes at the
    block rows past the correction were computed from the draft's (wrong) tokens, which is
    one Jacobi iteration for the positions after the correction; they are the next block's
    guesses, extended by the recycled-successor walk from the last guess (the shared table
    of `TokenRecycling`). Guesses are kept only if the sequence commits exactly what the
    greedy verdict predicted (a sampled commit drops them)."""

    def __init__(self, k: int = SUCCESSORS, name: str = "jacobi") -> None:
        super().__init__(k, name)
        self._guess: list[int] = []
        self._after: list[int] = []  # the commit the guesses assume

    def reset(self, context: Sequence[int]) -> None:
        super().reset(context)
        self._guess, self._after = [], []

    def observe(self, rows: Sequence[int], logits: torch.Tensor) -> None:
        super().observe(rows, logits)
        best = logits.argmax(-1).tolist()
        a = 0
        while a + 1 < len(rows) and rows[a + 1] == best[a]:
            a += 1
        self._after = [*rows[1 : a + 1], best[a]]
        self._guess = best[a + 1 : len(rows)]

    def extend(self, tokens: Sequence[int]) -> None:
        if list(tokens) != self._after:
            self._guess = []
        self._after = []
        super().extend(tokens)

    def propose(self, max_tokens: int) -> Proposal:
        """The Jacobi guesses, then first successors from the last one, at most
        `max_tokens`."""
        check_max_tokens(max_tokens)
        tokens = list(self._guess[:max_tokens])
        return self._walk(tokens, tokens[-1] if tokens else self._last, max_tokens)


@register("jacobi", "Jacobi iterates from the target's own verification, extended by recycled "
          "successors (TR-Jacobi without training)")  # fmt: skip
def _jacobi(settings: SourceSettings) -> JacobiGuesses:
    return JacobiGuesses()
