"""Prompt lookup decoding: propose what followed the last n-gram's earlier occurrence.

As in transformers' `prompt_lookup_num_tokens` (after Saxena's prompt-lookup-decoding), the
last n committed tokens are searched for earlier in the sequence, trying n from `max_ngram`
down to `min_ngram`; the tokens that followed the occurrence are the draft. We use the most
recent earlier occurrence (transformers scans for the first one) and keep an `NgramIndex`
updated on every commit, so a proposal is a few dict lookups instead of a rescan.

`NgramIndex` is also the n-gram database of each level of Hierarchy Drafting (hierarchy.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mirror_sd.runtime.drafters.base import Proposal, check_max_tokens
from mirror_sd.runtime.drafters.sources import SourceSettings, register


class NgramIndex:
    """Token segments plus a table from each n-gram to what followed its latest occurrence.

    For every n in [min_ngram, max_ngram] and every occurrence of an n-gram that is followed
    by at least one token in its segment, the table maps the n-gram to (segment id, position
    of the following token). Later occurrences overwrite earlier ones, so a lookup returns the
    most recently indexed occurrence. Indexing costs O(max_ngram^2) per token.
    """

    def __init__(self, *, min_ngram: int, max_ngram: int) -> None:
        """Raises ValueError unless 1 <= min_ngram <= max_ngram."""
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(
                f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, "
                f"max_ngram={max_ngram}"
            )
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram
        self._segments: dict[int, list[int]] = {}
        self._table: dict[tuple[int, ...], tuple[int, int]] = {}
        self._next_id = 0

    def __len__(self) -> int:
        """Number of distinct n-grams in the table."""
        return len(self._table)

    def add(self, tokens: Iterable[int] = ()) -> int:
        """Index a new segment holding `tokens`; returns its id (ids are never reused)."""
        seg_id = self._next_id
        self._next_id += 1
        self._segments[seg_id] = []
        self.extend(seg_id, tokens)
        return seg_id

    def extend(self, seg_id: int, tokens: Iterable[int]) -> None:
        """Append `tokens` to segment `seg_id`, indexing the n-grams they now follow."""
        seg = self._segments[seg_id]
        table, lo, hi = self._table, self.min_ngram, self.max_ngram
        for t in tokens:
            i = len(seg)  # position of t: the n-grams ending at i-1 now have a follower
            for n in range(lo, min(hi, i) + 1):
                table[tuple(seg[i - n : i])] = (seg_id, i)
            seg.append(t)

    def remove(self, seg_id: int) -> None:
        """Drop segment `seg_id` and the table entries that point into it.

        An n-gram whose latest occurrence was in this segment is forgotten even if an older
        segment also holds it; removing segments oldest-first (as an LRU does) loses nothing.
        """
        seg = self._segments.pop(seg_id)
        table, lo, hi = self._table, self.min_ngram, self.max_ngram
        for i in range(1, len(seg)):
            for n in range(lo, min(hi, i) + 1):
                key = tuple(seg[i - n : i])
                if table.get(key) == (seg_id, i):
                    del table[key]

    def segment(self, seg_id: int) -> Sequence[int]:
        """The tokens of segment `seg_id` (the live list: do not modify it)."""
        return self._segments[seg_id]

    def find(self, context: Sequence[int], max_tokens: int) -> tuple[tuple[int, ...], int]:
        """Look up the longest indexed suffix of `context` (n from max_ngram down to min_ngram).

        Returns (up to `max_tokens` tokens that followed its latest occurrence, n), or
        ((), 0) when no suffix is indexed or `max_tokens` is 0.
        """
        if max_tokens <= 0:
            return (), 0
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            hit = self._table.get(tuple(context[len(context) - n :]))
            if hit is not None:
                seg_id, pos = hit
                return tuple(self._segments[seg_id][pos : pos + max_tokens]), n
        return (), 0


class PromptLookup:
    """Prompt lookup decoding over the committed sequence (prompt + generated tokens).

    `propose` returns the tokens after the most recent earlier occurrence of the last n
    committed tokens, for the largest n in [min_ngram, max_ngram] that occurs; `match_len` is
    that n. The continuation is cut at the end of the committed sequence.
    """

    def __init__(self, *, max_ngram: int, min_ngram: int = 1, name: str = "prompt_lookup") -> None:
        """Raises ValueError unless 1 <= min_ngram <= max_ngram."""
        self.name = name
        self._index = NgramIndex(min_ngram=min_ngram, max_ngram=max_ngram)
        self._seg = self._index.add()

    def reset(self, context: Sequence[int]) -> None:
        """Start a sequence: index `context` from scratch."""
        self._index = NgramIndex(min_ngram=self._index.min_ngram, max_ngram=self._index.max_ngram)
        self._seg = self._index.add(context)

    def extend(self, tokens: Sequence[int]) -> None:
        """Index committed tokens."""
        self._index.extend(self._seg, tokens)

    def propose(self, max_tokens: int) -> Proposal:
        """What followed the longest earlier-occurring suffix n-gram, at most `max_tokens`."""
        check_max_tokens(max_tokens)
        tokens, n = self._index.find(self._index.segment(self._seg), max_tokens)
        return Proposal(tokens, n, self.name) if tokens else Proposal.empty(self.name)


@register("pld", "prompt lookup: what followed the last n-gram's earlier occurrence")
def _pld(settings: SourceSettings) -> PromptLookup:
    return PromptLookup(max_ngram=settings.max_ngram, name="pld")
