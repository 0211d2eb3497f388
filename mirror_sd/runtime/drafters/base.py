"""The draft-source interface: anything that proposes a continuation of the committed tokens.

A draft source follows one sequence: `reset(prompt)` starts it, `extend(tokens)` reports
tokens the target committed, and `propose(max_tokens)` returns a deterministic guess at what
comes next. A source that learns from finished generations also has `finish(prompt,
output)`, which the plan calls after each generation. Sources register their
`speculation.retrieval` names in sources.py.

In a batch every sequence gets its own fork of the plan's source (`sources.fork`: a shallow
copy, then `reset`), so `reset` must *rebind* its per-sequence state, never mutate it in
place; plan-level memory (a corpus, recent outputs, references) stays shared. The scheduler
gates each sequence's proposals with `Combined` (SAM-Decoding's rule: retrieval when its match
is long enough) and drafts the rest with the model, one batched chain for all of them.
Sources are called every round, so `propose` and `extend` cost O(1) amortized per token (or
O(n-gram size)), never a rescan of the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Proposal:
    """A proposed continuation of the committed sequence.

    Attributes:
        tokens: the proposed next tokens, at most the `max_tokens` that were asked for; may
            be empty (the source has nothing to offer).
        match_len: length of the committed suffix that matched the text the tokens were read
            from (0 = no match); a confidence signal. Always 0 when `tokens` is empty.
        source: name of the source that produced the tokens (e.g. "sam:dynamic").
        q: the distributions (len(tokens), V) the tokens were sampled from (a model draft
            that samples); None for a deterministic proposal, which verification treats as
            one-hot (lossless either way).
    """

    tokens: tuple[int, ...]
    match_len: int
    source: str
    q: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.match_len < 0:
            raise ValueError(f"Proposal.match_len must be >= 0, got {self.match_len}")
        if not self.tokens and self.match_len != 0:
            raise ValueError(
                f"an empty Proposal from {self.source!r} must have match_len 0, "
                f"got {self.match_len}"
            )

    @classmethod
    def empty(cls, source: str) -> Proposal:
        """The "nothing to propose" answer of `source`."""
        return cls((), 0, source)


@runtime_checkable
class DraftSource(Protocol):
    """A source of draft tokens that follows one sequence.

    Contract: after `reset(c)` and `extend(t1)`, `extend(t2)`, ... the source's state
    describes the committed sequence `c + t1 + t2 + ...`, and `propose` answers exactly as it
    would after `reset(c + t1 + t2 + ...)`.
    """

    name: str

    def reset(self, context: Sequence[int]) -> None:
        """Start a new sequence whose committed tokens are `context` (the prompt ids)."""
        ...

    def extend(self, tokens: Sequence[int]) -> None:
        """Record `tokens` as committed after everything committed so far."""
        ...

    def propose(self, max_tokens: int) -> Proposal:
        """Propose at most `max_tokens` tokens continuing the committed sequence.

        Raises:
            ValueError: if `max_tokens` is negative.
        """
        ...


def check_max_tokens(max_tokens: int) -> None:
    """Raise ValueError unless `max_tokens` is a non-negative int (shared by all sources)."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
