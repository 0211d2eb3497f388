"""Exact proposals of the model-free draft sources on hand-made sequences."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror_sd.runtime.drafters import (
    Combined,
    DraftSource,
    HierarchyDrafter,
    PromptLookup,
    Proposal,
    ReferenceSource,
    SamDrafter,
    SuffixAutomaton,
)


class Constant:
    """A stand-in for the model draft: always proposes the same tokens; counts calls."""

    def __init__(self, tokens: Sequence[int], name: str = "model") -> None:
        self.name = name
        self.tokens = tuple(tokens)
        self.committed: list[int] = []
        self.proposals = 0

    def reset(self, context: Sequence[int]) -> None:
        self.committed = list(context)

    def extend(self, tokens: Sequence[int]) -> None:
        self.committed.extend(tokens)

    def propose(self, max_tokens: int) -> Proposal:
        self.proposals += 1
        return Proposal(self.tokens[:max_tokens], 0, self.name)


def started(source, context, *generated):
    """`source` after reset(context) and one extend per generated chunk."""
    source.reset(context)
    for chunk in generated:
        source.extend(chunk)
    return source


# --- Proposal and the protocol ---------------------------------------------------------------


def test_proposal_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="match_len 0"):
        Proposal((), 2, "x")
    with pytest.raises(ValueError, match=">= 0"):
        Proposal((1,), -1, "x")


@pytest.mark.parametrize(
    "source",
    [
        SamDrafter(),
        PromptLookup(max_ngram=3),
        HierarchyDrafter(max_ngram=3, capacity=2),
        ReferenceSource(),
        Combined(SamDrafter(), Constant([1]), threshold=1),
    ],
)
def test_every_source_is_a_draft_source_and_handles_empty_and_bad_requests(source):
    assert isinstance(source, DraftSource)
    source.reset([])
    assert source.propose(4).tokens in ((), (1,))  # Combined falls back to Constant
    started(source, [1, 2, 3, 1, 2])
    nothing = source.propose(0)
    assert (nothing.tokens, nothing.match_len) == ((), 0)
    with pytest.raises(ValueError, match="max_tokens"):
        source.propose(-1)


# --- suffix automaton and SAM-Decoding -------------------------------------------------------


def test_automaton_repeated_suffix_and_continuation():
    sam = SuffixAutomaton([1, 2, 3, 1, 2])
    assert sam.longest_repeated_suffix() == (2, 1)
    assert sam.continuation(1, 3) == (3, 1, 2)
    assert sam.continuation(1, 10) == (3, 1, 2)
    assert SuffixAutomaton().longest_repeated_suffix() == (0, -1)
    assert SuffixAutomaton().num_states == 1


def test_sam_empty_context_and_no_match():
    assert started(SamDrafter(), []).propose(4) == Proposal((), 0, "sam")
    assert started(SamDrafter([[7, 8]]), [1, 2, 3]).propose(4) == Proposal((), 0, "sam")


def test_sam_dynamic_match_and_truncation():
    drafter = started(SamDrafter(), [5, 6, 7, 8, 5, 6])
    assert drafter.propose(3) == Proposal((7, 8, 5), 2, "sam:dynamic")
    assert drafter.propose(1) == Proposal((7,), 2, "sam:dynamic")
    assert drafter.propose(10) == Proposal((7, 8, 5, 6), 2, "sam:dynamic")  # cut at the end


def test_sam_static_match():
    drafter = started(SamDrafter([[1, 2, 3, 4], [9, 1, 2, 7]]), [8, 1, 2])
    assert drafter.propose(5) == Proposal((3, 4), 2, "sam:static")  # first occurrence, doc end


def test_sam_documents_never_join():
    corpus = [[1, 2, 3], [4, 5, 6]]
    # "3 4" spans the two documents: only "4" matches, at the start of the second.
    assert started(SamDrafter(corpus), [3, 4]).propose(5) == Proposal((5, 6), 1, "sam:static")
    # "2 3" ends the first document: nothing follows it there, and nothing else matches.
    assert started(SamDrafter(corpus), [2, 3]).propose(5) == Proposal((), 0, "sam")


def test_sam_tie_prefers_dynamic_and_longer_static_wins():
    tie = started(SamDrafter([[1, 2, 9]]), [1, 2, 5, 1, 2])
    assert tie.propose(3) == Proposal((5, 1, 2), 2, "sam:dynamic")
    longer = started(SamDrafter([[5, 1, 2, 9]]), [7, 1, 2, 5, 1, 2])
    assert longer.propose(3) == Proposal((9,), 3, "sam:static")


def test_sam_empty_continuation_falls_back_to_the_other_match():
    # static "1 2 3" (3) ends its document; the dynamic "2 3" (2) has a continuation.
    drafter = started(SamDrafter([[1, 2, 3]]), [2, 3, 4, 1, 2, 3])
    assert drafter.propose(2) == Proposal((4, 1), 2, "sam:dynamic")


def test_sam_extend_equals_reset_with_everything():
    corpus = [[1, 2, 3, 4, 5], [2, 3, 9]]
    chunked = started(SamDrafter(corpus), [7, 1], [2], [3, 7], [1, 2])
    whole = started(SamDrafter(corpus), [7, 1, 2, 3, 7, 1, 2])
    assert chunked.propose(4) == whole.propose(4) == Proposal((3, 7, 1, 2), 3, "sam:dynamic")


def test_sam_corpus_save_load_round_trip(tmp_path):
    path = tmp_path / "corpus.npz"
    SuffixAutomaton.from_documents([[1, 2, 3, 4], [9, 1, 2, 7]]).save(path)
    drafter = started(SamDrafter(SuffixAutomaton.load(path)), [8, 1, 2])
    assert drafter.propose(5) == Proposal((3, 4), 2, "sam:static")


def test_automaton_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.arange(3))
    with pytest.raises(ValueError, match="not a SuffixAutomaton file"):
        SuffixAutomaton.load(path)


def test_corpus_rejects_negative_ids():
    with pytest.raises(ValueError, match="document 1"):
        SuffixAutomaton.from_documents([[1], [2, -1]])


# --- prompt lookup ---------------------------------------------------------------------------


def test_prompt_lookup_basic_and_truncation():
    source = started(PromptLookup(max_ngram=3), [1, 2, 3, 4, 1, 2])
    assert source.propose(3) == Proposal((3, 4, 1), 2, "prompt_lookup")
    assert source.propose(1) == Proposal((3,), 2, "prompt_lookup")
    assert started(PromptLookup(max_ngram=2), [1, 2, 1]).propose(5) == Proposal(
        (2, 1), 1, "prompt_lookup"
    )


def test_prompt_lookup_uses_most_recent_occurrence_and_longest_ngram():
    recent = started(PromptLookup(max_ngram=2), [1, 2, 3, 1, 2, 4, 1, 2])
    assert recent.propose(3) == Proposal((4, 1, 2), 2, "prompt_lookup")
    longest = started(PromptLookup(max_ngram=3), [1, 2, 3, 9, 2, 3, 7, 1, 2, 3])
    assert longest.propose(2) == Proposal((9, 2), 3, "prompt_lookup")


def test_prompt_lookup_no_match_empty_context_and_min_ngram():
    assert started(PromptLookup(max_ngram=3), []).propose(3) == Proposal.empty("prompt_lookup")
    assert started(PromptLookup(max_ngram=3), [1, 2, 3]).propose(3).tokens == ()
    assert started(PromptLookup(max_ngram=3, min_ngram=2), [1, 5, 1]).propose(3).tokens == ()


def test_prompt_lookup_rejects_bad_ngram_sizes():
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(max_ngram=2, min_ngram=0)


def brute_prompt_lookup(seq, k, lo, hi):
    """Try n = hi..lo: latest i < len(seq)-n with seq[i:i+n] == last n tokens."""
    for n in range(min(hi, len(seq)), lo - 1, -1):
        for i in range(len(seq) - n - 1, -1, -1):
            if seq[i : i + n] == seq[-n:]:
                return tuple(seq[i + n : i + n + k]), n
    return (), 0


@given(
    st.lists(st.integers(0, 3), max_size=40),
    st.lists(st.integers(0, 3), max_size=20),
    st.integers(0, 6),
    st.integers(1, 3),
    st.integers(0, 2),
)
def test_prompt_lookup_matches_bruteforce(context, generated, k, lo, extra):
    source = started(PromptLookup(max_ngram=lo + extra, min_ngram=lo), context, generated)
    tokens, n = brute_prompt_lookup(context + generated, k, lo, lo + extra)
    assert source.propose(k) == Proposal(tokens, n if tokens else 0, "prompt_lookup")


# --- hierarchy drafting ----------------------------------------------------------------------


def test_hd_context_level_first():
    hd = started(HierarchyDrafter(max_ngram=2, capacity=2, corpus=[[1, 2, 8, 8]]), [1, 2, 3, 1, 2])
    assert hd.propose(2) == Proposal((3, 1), 2, "hd:context")
    assert hd.propose(3) == Proposal((3, 1, 2), 2, "hd:context")  # tie with corpus: local wins


def test_hd_less_local_level_when_it_has_more_tokens():
    hd = HierarchyDrafter(max_ngram=2, capacity=2, corpus=[[1, 2, 8, 8, 8, 8]])
    assert started(hd, [1, 2, 3, 1, 2]).propose(5) == Proposal((8, 8, 8, 8), 2, "hd:corpus")


def test_hd_recent_level_and_match_len():
    hd = HierarchyDrafter(max_ngram=2, capacity=2, corpus=[[5, 9, 9]])
    hd.remember([4, 5, 6, 7])
    assert started(hd, [0, 4, 5]).propose(2) == Proposal((6, 7), 2, "hd:recent")
    assert started(hd, [0, 5]).propose(2) == Proposal((6, 7), 1, "hd:recent")  # recent > corpus
    assert started(hd, [0, 9]).propose(2) == Proposal((9,), 1, "hd:corpus")
    assert started(hd, [3]).propose(2) == Proposal.empty("hd")


def test_hd_corpus_documents_never_join():
    hd = HierarchyDrafter(max_ngram=2, capacity=0, corpus=[[1, 2], [3, 4]])
    assert started(hd, [0, 2]).propose(2) == Proposal.empty("hd")


def test_hd_recent_is_a_bounded_lru():
    hd = HierarchyDrafter(max_ngram=2, capacity=2)
    hd.remember([1, 2, 3])
    hd.remember([1, 2, 4])
    assert started(hd, [1, 2]).propose(1) == Proposal((4,), 2, "hd:recent")
    hd.remember([1, 2, 3])  # refreshed: now the most recent
    assert hd.recent == [(1, 2, 4), (1, 2, 3)]
    assert started(hd, [1, 2]).propose(1) == Proposal((3,), 2, "hd:recent")
    hd.remember([7, 7])  # evicts (1, 2, 4); (1, 2, 3) still answers
    assert hd.recent == [(1, 2, 3), (7, 7)]
    assert started(hd, [1, 2]).propose(2) == Proposal((3,), 2, "hd:recent")
    hd.remember([8, 8])  # evicts (1, 2, 3)
    assert started(hd, [1, 2]).propose(2) == Proposal.empty("hd")


def test_hd_capacity_zero_ignores_remember_and_rejects_negative():
    hd = HierarchyDrafter(max_ngram=2, capacity=0)
    hd.remember([1, 2, 3])
    assert hd.recent == []
    with pytest.raises(ValueError, match="capacity"):
        HierarchyDrafter(max_ngram=2, capacity=-1)


@given(
    st.lists(st.integers(0, 3), max_size=30),
    st.lists(st.integers(0, 3), max_size=10),
    st.integers(0, 5),
)
def test_hd_context_only_equals_prompt_lookup(context, generated, k):
    hd = started(HierarchyDrafter(max_ngram=3, capacity=0), context, generated).propose(k)
    pl = started(PromptLookup(max_ngram=3), context, generated).propose(k)
    assert (hd.tokens, hd.match_len) == (pl.tokens, pl.match_len)
    assert hd.source == ("hd:context" if pl.tokens else "hd")


# --- reference reuse -------------------------------------------------------------------------


def test_reference_follows_then_realigns():
    source = started(ReferenceSource({(1, 2): [10, 11, 12, 13, 14]}), [1, 2])
    assert source.propose(3) == Proposal((10, 11, 12), 2, "reference")
    source.extend([10, 11])
    assert source.propose(2) == Proposal((12, 13), 4, "reference")
    source.extend([99])  # diverged; nothing of the generation's suffix is in the reference
    assert source.position is None
    assert source.propose(2) == Proposal.empty("reference")
    source.extend([13])  # "13" is in the reference: realigned after it
    assert source.propose(2) == Proposal((14,), 1, "reference")


def test_reference_realigns_on_longest_suffix():
    source = started(ReferenceSource({(): [5, 6, 7, 5, 6, 8, 9]}), [], [5, 6])
    assert source.propose(1) == Proposal((7,), 2, "reference")
    source.extend([8])  # the reference says 7, but "5 6 8" occurs later in it
    assert source.propose(3) == Proposal((9,), 3, "reference")


def test_reference_end_and_unknown_prompt():
    source = ReferenceSource()
    source.remember([1], [4, 5])
    assert started(source, [1], [4, 5]).propose(3) == Proposal.empty("reference")
    source.extend([4])  # past the end: realigned at the first 4
    assert source.propose(3) == Proposal((5,), 1, "reference")
    assert started(source, [2]).propose(3) == Proposal.empty("reference")


# --- combination -----------------------------------------------------------------------------


def test_combined_uses_retrieval_at_threshold():
    model = Constant([42, 43])
    combined = started(Combined(SamDrafter(), model, threshold=2), [1, 2, 3, 1, 2])
    assert combined.propose(2) == Proposal((3, 1), 2, "sam:dynamic")
    assert model.proposals == 0
    assert model.committed == [1, 2, 3, 1, 2]
    combined.extend([3])
    assert model.committed == [1, 2, 3, 1, 2, 3]


def test_combined_falls_back_below_threshold_or_when_empty():
    below = started(Combined(SamDrafter(), Constant([42, 43]), threshold=3), [1, 2, 3, 1, 2])
    assert below.propose(5) == Proposal((42, 43), 0, "model")
    empty = started(Combined(SamDrafter(), Constant([42]), threshold=0), [1, 2, 3])
    assert empty.propose(5) == Proposal((42,), 0, "model")
    with pytest.raises(ValueError, match="threshold"):
        Combined(SamDrafter(), Constant([]), threshold=-1)


# --- every source: extend is the same as resetting with everything ---------------------------


def make_sources():
    hd = HierarchyDrafter(max_ngram=3, capacity=2, corpus=[[0, 1, 2, 3, 0, 1]])
    hd.remember([2, 2, 1, 0, 3])
    return [
        SamDrafter([[0, 1, 2, 3], [3, 2, 1]]),
        PromptLookup(max_ngram=3),
        hd,
        Combined(PromptLookup(max_ngram=2), SamDrafter(), threshold=2),
    ]


@given(
    st.lists(st.lists(st.integers(0, 3), max_size=8), min_size=1, max_size=5),
    st.integers(0, 6),
)
def test_extend_in_chunks_equals_reset_with_everything(chunks, k):
    for chunked, whole in zip(make_sources(), make_sources(), strict=True):
        started(chunked, chunks[0], *chunks[1:])
        started(whole, [t for chunk in chunks for t in chunk])
        assert chunked.propose(k) == whole.propose(k)
