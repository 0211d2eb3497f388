"""SAM-Decoding's combination rule: retrieval when its match is long enough, else a fallback.

SAM-Decoding drafts from its suffix automata when the match length reaches a threshold and
from an auxiliary drafter (a model draft, or another retrieval method) otherwise. `Combined`
applies that rule to any two `DraftSource`s and keeps the chosen proposal's `source`, so the
runtime and its traces can tell which source drafted each round.
"""

from __future__ import annotations

from collections.abc import Sequence

from mirror_sd.runtime.drafters.base import DraftSource, Proposal, check_max_tokens


class Combined:
    """Retrieval proposal if non-empty with match_len >= threshold, else the fallback's.

    Both sources follow the sequence (reset and extend go to both); the fallback's `propose`
    runs only when the retrieval proposal is rejected, since it may be a model forward.
    """

    def __init__(
        self,
        retrieval: DraftSource,
        fallback: DraftSource | None,
        *,
        threshold: int,
        name: str = "combined",
    ) -> None:
        """Args:
        retrieval: the preferred source (e.g. SamDrafter).
        fallback: used when retrieval's match is shorter than `threshold` or empty; None
            proposes nothing then (retrieval alone, gated by its match length).
        threshold: minimum match_len (>= 0) for the retrieval proposal to be used.
        name: this source's name (the proposals keep the name of the source that made them).

        Raises:
            ValueError: if threshold is negative.
        """
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.name = name
        self.retrieval = retrieval
        self.fallback = fallback
        self.threshold = threshold

    def reset(self, context: Sequence[int]) -> None:
        """Start a sequence in both sources."""
        self.retrieval.reset(context)
        if self.fallback is not None:
            self.fallback.reset(context)

    def extend(self, tokens: Sequence[int]) -> None:
        """Commit tokens in both sources."""
        self.retrieval.extend(tokens)
        if self.fallback is not None:
            self.fallback.extend(tokens)

    def observe(self, rows: Sequence[int], logits) -> None:
        """A verification block and the target's logits after each row, for sources that
        learn from them (Token Recycling); others ignore it."""
        for source in (self.retrieval, self.fallback):
            if hasattr(source, "observe"):
                source.observe(rows, logits)

    def propose(self, max_tokens: int) -> Proposal:
        """The retrieval proposal when it qualifies, else the fallback's proposal."""
        check_max_tokens(max_tokens)
        proposal = self.retrieval.propose(max_tokens)
        if proposal.tokens and proposal.match_len >= self.threshold:
            return proposal
        if self.fallback is None:
            return Proposal.empty(self.name)
        return self.fallback.propose(max_tokens)
