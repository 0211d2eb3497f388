"""Property tests: the suffix automaton agrees with brute-force longest-suffix searches."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mirror_sd.runtime.drafters import SEPARATOR, SamDrafter, SuffixAutomaton, SuffixMatch

tokens = st.lists(st.integers(0, 2), max_size=40)
documents = st.lists(st.lists(st.integers(0, 2), max_size=15), max_size=4)
max_tokens = st.integers(0, 6)


def first_end(text: list[int], w: list[int], before: int) -> int:
    """Smallest end index e < `before` with text[e-len(w)+1 : e+1] == w, or -1."""
    n = len(w)
    for e in range(n - 1, before):
        if text[e - n + 1 : e + 1] == w:
            return e
    return -1


def brute_repeated_suffix(text: list[int]) -> tuple[int, int]:
    """Longest suffix of `text` that also ends earlier, with its first end index."""
    for length in range(len(text) - 1, 0, -1):
        e = first_end(text, text[-length:], len(text) - 1)
        if e >= 0:
            return length, e
    return 0, -1


def brute_match(text: list[int], stream: list[int]) -> tuple[int, int]:
    """Longest suffix of `stream` occurring in `text`, with its first end index."""
    for length in range(len(stream), 0, -1):
        e = first_end(text, stream[-length:], len(text))
        if e >= 0:
            return length, e
    return 0, -1


def brute_continuation(text: list[int], end: int, k: int) -> tuple[int, ...]:
    """text[end+1 : end+1+k], cut at the first separator."""
    out = []
    for t in text[end + 1 : end + 1 + k]:
        if t < 0:
            break
        out.append(t)
    return tuple(out)


def corpus_text(docs: list[list[int]]) -> list[int]:
    return [t for doc in docs for t in [*doc, SEPARATOR]]


@given(tokens, max_tokens)
def test_repeated_suffix_matches_bruteforce_after_every_token(text, k):
    sam = SuffixAutomaton()
    for i, t in enumerate(text):
        sam.extend(t)
        prefix = text[: i + 1]
        length, end = sam.longest_repeated_suffix()
        assert (length, end) == brute_repeated_suffix(prefix)
        if length:
            assert sam.continuation(end, k) == brute_continuation(prefix, end, k)


@given(documents, tokens, max_tokens)
def test_stream_match_matches_bruteforce_and_never_spans_documents(docs, stream, k):
    sam = SuffixAutomaton.from_documents(docs)
    text = corpus_text(docs)
    match = SuffixMatch(sam)
    for i, t in enumerate(stream):
        match.feed(t)
        assert (match.length, match.end) == brute_match(text, stream[: i + 1])
        assert match.continuation(k) == (
            brute_continuation(text, match.end, k) if match.length else ()
        )


@given(documents, tokens)
def test_incremental_match_equals_recomputation(docs, stream):
    sam = SuffixAutomaton.from_documents(docs)
    incremental = SuffixMatch(sam)
    for i, t in enumerate(stream):
        incremental.feed(t)
        fresh = SuffixMatch(sam)
        fresh.feed_many(stream[: i + 1])
        assert (incremental.state, incremental.length) == (fresh.state, fresh.length)


binary = st.lists(st.integers(0, 1), max_size=10)


@example(text=[0, 0, 1, 0], before=[1, 1, 1], more=[1, 1, 0], after=[1, 1])
@given(binary, binary, binary, binary)
def test_match_stays_valid_while_the_automaton_grows(text, before, more, after):
    sam = SuffixAutomaton(text)
    match = SuffixMatch(sam)
    match.feed_many(before)
    sam.extend_many(more)  # may split the state the match is in
    grown = text + more
    seen = list(before)
    for t in after:
        match.feed(t)
        seen.append(t)
        assert match.length <= brute_match(grown, seen)[0]
        if match.length:
            assert match.end == first_end(grown, seen[-match.length :], len(grown))


@given(tokens)
def test_state_and_transition_counts_are_linear(text):
    sam = SuffixAutomaton(text)
    n = len(text)
    assert sam.num_states <= max(1, 2 * n)
    assert sam.num_transitions <= max(1, 3 * n)


@given(documents, tokens, tokens, max_tokens)
def test_sam_drafter_matches_bruteforce_rule(docs, context, generated, k):
    drafter = SamDrafter(docs)
    drafter.reset(context)
    drafter.extend(generated)
    seq = context + generated
    text = corpus_text(docs)
    dyn_len, dyn_end = brute_repeated_suffix(seq)
    st_len, st_end = brute_match(text, seq)
    dynamic = (dyn_len, brute_continuation(seq, dyn_end, k), "sam:dynamic")
    static = (st_len, brute_continuation(text, st_end, k), "sam:static")
    expected = (0, (), "sam")
    for length, cont, source in (dynamic, static) if dyn_len >= st_len else (static, dynamic):
        if length and cont:
            expected = (length, cont, source)
            break
    p = drafter.propose(k)
    assert (p.match_len, p.tokens, p.source) == expected


@settings(max_examples=30, deadline=None)
@given(documents, tokens)
def test_save_load_round_trip_is_exact(docs, stream):
    sam = SuffixAutomaton.from_documents(docs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.npz"
        sam.save(path)
        loaded = SuffixAutomaton.load(path)
    assert loaded._tokens == sam._tokens
    assert loaded._length == sam._length
    assert loaded._link == sam._link
    assert loaded._end == sam._end
    assert loaded._next == sam._next
    a, b = SuffixMatch(sam), SuffixMatch(loaded)
    for t in stream:
        assert a.feed(t) == b.feed(t)
        assert a.end == b.end
