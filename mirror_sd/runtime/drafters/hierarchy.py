"""Hierarchy Drafting: n-gram databases ordered by temporal locality, most local first.

Hierarchy Drafting (HD; Cho et al. 2025, "Lossless Acceleration of Large Language Models with
Hierarchical Drafting based on Temporal Locality") keeps several token databases and queries
them from the most to the least local until the draft is long enough. Here there are three,
each an `NgramIndex` from n-gram prefixes to the tokens that followed them:

1. "context": this sequence's committed tokens (prompt + generated so far);
2. "recent": this plan's recent outputs, a bounded LRU of previous generations fed by
   `remember(tokens)` after each generation;
3. "corpus": a static corpus of documents, given at construction.

Within a level the longest matching n-gram (max_ngram down to min_ngram) wins; a level whose
continuation has `max_tokens` tokens ends the search. Otherwise the longest continuation
found is proposed, the more local level winning ties.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from mirror_sd.runtime.drafters.base import Proposal, check_max_tokens
from mirror_sd.runtime.drafters.prompt_lookup import NgramIndex
from mirror_sd.runtime.drafters.sources import RECENT_OUTPUTS, SourceSettings, register


class HierarchyDrafter:
    """Hierarchy Drafting over context, recent outputs and a static corpus.

    `Proposal.source` names the level that produced the tokens ("<name>:context",
    "<name>:recent" or "<name>:corpus"); `match_len` is the n-gram size that matched there.
    """

    def __init__(
        self,
        *,
        max_ngram: int,
        capacity: int,
        corpus: Iterable[Sequence[int]] = (),
        min_ngram: int = 1,
        name: str = "hd",
    ) -> None:
        """Args:
        max_ngram, min_ngram: n-gram sizes tried, longest first (1 <= min <= max).
        capacity: how many recent generations `remember` keeps (>= 0; 0 disables the level).
        corpus: documents of the static level; n-grams never span two documents.
        name: prefix of `Proposal.source`.

        Raises:
            ValueError: on bad n-gram sizes or a negative capacity.
        """
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.name = name
        self.capacity = capacity
        self._context = NgramIndex(min_ngram=min_ngram, max_ngram=max_ngram)
        self._context_seg = self._context.add()
        self._recent = NgramIndex(min_ngram=min_ngram, max_ngram=max_ngram)
        self._recent_lru: OrderedDict[tuple[int, ...], int] = OrderedDict()
        self._corpus = NgramIndex(min_ngram=min_ngram, max_ngram=max_ngram)
        for doc in corpus:
            self._corpus.add(doc)

    def finish(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        """A generation ended: its output joins the recent-outputs level (`remember`)."""
        self.remember(output)

    def remember(self, tokens: Sequence[int]) -> None:
        """Add a finished generation to the recent-outputs level as its most recent entry.

        Remembering a generation already held refreshes it; beyond `capacity` generations the
        least recently remembered one is evicted. Empty generations are ignored.
        """
        key = tuple(tokens)
        if not key or self.capacity == 0:
            return
        old = self._recent_lru.pop(key, None)
        if old is not None:
            self._recent.remove(old)
        self._recent_lru[key] = self._recent.add(key)
        while len(self._recent_lru) > self.capacity:
            _, evicted = self._recent_lru.popitem(last=False)
            self._recent.remove(evicted)

    @property
    def recent(self) -> list[tuple[int, ...]]:
        """The remembered generations, least recent first."""
        return list(self._recent_lru)

    def reset(self, context: Sequence[int]) -> None:
        """Start a sequence: the context level holds `context` only; other levels persist."""
        lo, hi = self._context.min_ngram, self._context.max_ngram
        self._context = NgramIndex(min_ngram=lo, max_ngram=hi)
        self._context_seg = self._context.add(context)

    def extend(self, tokens: Sequence[int]) -> None:
        """Add committed tokens to the context level."""
        self._context.extend(self._context_seg, tokens)

    def propose(self, max_tokens: int) -> Proposal:
        """Query context, recent, corpus in turn; see the module docstring for the rule."""
        check_max_tokens(max_tokens)
        committed = self._context.segment(self._context_seg)
        levels = (("context", self._context), ("recent", self._recent), ("corpus", self._corpus))
        best = Proposal.empty(self.name)
        for level, index in levels:
            tokens, n = index.find(committed, max_tokens)
            if len(tokens) > len(best.tokens):
                best = Proposal(tokens, n, f"{self.name}:{level}")
                if len(tokens) == max_tokens:
                    break
        return best


@register("hd", "Hierarchy Drafting: context, this plan's recent outputs, a corpus")
def _hd(settings: SourceSettings) -> HierarchyDrafter:
    return HierarchyDrafter(max_ngram=settings.max_ngram, capacity=RECENT_OUTPUTS, name="hd")
