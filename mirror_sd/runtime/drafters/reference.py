"""SPEC-RL style reference source: a previous output for the same prompt is the draft.

SPEC-RL (reusing the last epoch's rollouts as speculative prefixes) and "predicted outputs"
have a reference continuation for the prompt at hand. This source keeps a reference per
prompt (`remember(prompt, output)`), and while generating it tracks the position in the
reference aligned with the committed tokens: as long as the generation follows the
reference, the next reference tokens are proposed. After a divergence it re-aligns at the
first occurrence in the reference of the longest suffix of the generated tokens (a
`SuffixMatch` on a suffix automaton of the reference, O(1) amortized per token), and stops
proposing while no suffix of the generation occurs in the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mirror_sd.runtime.drafters.base import Proposal, check_max_tokens
from mirror_sd.runtime.drafters.sources import SourceSettings, register
from mirror_sd.runtime.drafters.suffix_automaton import SuffixAutomaton, SuffixMatch


class ReferenceSource:
    """Proposes the continuation of a reference output aligned with the generation.

    The reference is chosen by `reset(context)`: the output remembered for that exact prompt
    (none: every proposal is empty), so unlike other sources, reset(c) + extend(t) is not
    reset(c + t): the prompt picks the reference. `match_len` is the length of the committed suffix that
    agrees with the reference at the aligned position: the prompt length plus the tokens
    followed since the start, or, after a re-alignment, the suffix match length plus the
    tokens followed since.
    """

    def __init__(
        self,
        references: Mapping[tuple[int, ...], Sequence[int]] | None = None,
        *,
        name: str = "reference",
    ) -> None:
        """Args:
        references: reference output per prompt (prompt ids as a tuple -> output ids).
        name: `Proposal.source` of this source's proposals.
        """
        self.name = name
        self._references: dict[tuple[int, ...], tuple[int, ...]] = {}
        for prompt, output in (references or {}).items():
            self.remember(prompt, output)
        self._reference: tuple[int, ...] = ()
        self._match: SuffixMatch | None = None
        self._pos: int | None = None
        self._aligned = 0

    def finish(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        """A generation ended: its output is the reference for the next one from `prompt`."""
        self.remember(prompt, output)

    def remember(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        """Use `output` as the reference for later generations from `prompt` (replaces any)."""
        self._references[tuple(prompt)] = tuple(output)

    @property
    def position(self) -> int | None:
        """Index in the reference of the next token to propose (None: not aligned)."""
        return self._pos

    def reset(self, context: Sequence[int]) -> None:
        """Start a sequence from prompt `context`, aligned at the start of its reference."""
        reference = self._references.get(tuple(context))
        if reference is None:
            self._reference, self._match, self._pos, self._aligned = (), None, None, 0
            return
        self._reference = reference
        self._match = SuffixMatch(SuffixAutomaton(reference))
        self._pos = 0
        self._aligned = len(context)

    def extend(self, tokens: Sequence[int]) -> None:
        """Advance the alignment over committed tokens, re-aligning after a divergence."""
        if self._match is None:
            return
        match = self._match
        for t in tokens:
            match.feed(t)
            pos = self._pos
            if pos is not None and pos < len(self._reference) and self._reference[pos] == t:
                self._pos = pos + 1
                self._aligned += 1
            else:
                self._realign(match)

    def _realign(self, match: SuffixMatch) -> None:
        """Align after the first occurrence of the longest matching suffix of the generation."""
        if match.length:
            self._pos = match.end + 1
            self._aligned = match.length
        else:
            self._pos, self._aligned = None, 0

    def propose(self, max_tokens: int) -> Proposal:
        """The next at most `max_tokens` reference tokens from the aligned position."""
        check_max_tokens(max_tokens)
        if self._pos is None:
            return Proposal.empty(self.name)
        tokens = self._reference[self._pos : self._pos + max_tokens]
        return Proposal(tokens, self._aligned, self.name) if tokens else Proposal.empty(self.name)


@register("reference", "this plan's last output for the same prompt (SPEC-RL's reuse)")
def _reference(settings: SourceSettings) -> ReferenceSource:
    return ReferenceSource(name="reference")
