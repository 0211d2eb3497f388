"""SAM-Decoding's draft source: suffix automata over a corpus and over the sequence itself.

A suffix automaton (Blumer et al. 1985) of a text is the smallest DFA accepting its suffixes;
every substring of the text is a path from the root. Each state is a class of substrings with
the same set of end positions; `length` is the longest one, `link` points to the state of the
longest suffix that falls in another class. We build it online (amortized O(1) per appended
token, at most 2n states and 3n transitions) over integer token ids, with transitions kept as
dicts, and store for each state its first end position in the token array, so a match can be
continued by reading the tokens that follow it (SAM-Decoding's `min_endpos`).

SAM-Decoding (Hu et al. 2024, arXiv 2411.10666) drafts with two automata:

- a static one over a corpus, built once (`SuffixAutomaton.from_documents`, `save`, `load`),
  matched against the committed sequence by a `SuffixMatch` that keeps (state, match length)
  up to date as tokens are committed;
- a dynamic one over prompt + generated tokens, extended as tokens are committed; its
  longest suffix with an earlier occurrence is `link(last)`, available in O(1).

`SamDrafter` proposes the continuation of the longer of the two matches (the dynamic one on
ties). Token ids must be >= 0: negative ids are reserved for document separators.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from os import PathLike

import numpy as np

from mirror_sd.runtime.drafters.base import Proposal, check_max_tokens
from mirror_sd.runtime.drafters.sources import SourceSettings, register

SEPARATOR = -1
"""Token placed after each corpus document; never in a query, so no match spans documents."""

_FORMAT = 1


class SuffixAutomaton:
    """Online suffix automaton over a growing sequence of int tokens.

    State 0 is the root (the empty string). For a state s: `length[s]` is its longest string,
    `link[s]` its suffix link (-1 for the root), `next[s]` its transitions {token: state},
    `end[s]` the first end position (index into the token array) of its strings.
    """

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        """An automaton of `tokens` (empty by default); grow it with `extend`."""
        self._tokens: list[int] = []
        self._length: list[int] = [0]
        self._link: list[int] = [-1]
        self._next: list[dict[int, int]] = [{}]
        self._end: list[int] = [-1]
        self._last = 0
        self.extend_many(tokens)

    @classmethod
    def from_documents(cls, documents: Iterable[Sequence[int]]) -> SuffixAutomaton:
        """A corpus automaton: each document followed by SEPARATOR, so matches stay inside one.

        Raises:
            ValueError: if a document contains a negative token id.
        """
        sam = cls()
        for i, doc in enumerate(documents):
            if any(t < 0 for t in doc):
                raise ValueError(f"document {i} has a negative token id; ids must be >= 0")
            sam.extend_many(doc)
            sam.extend(SEPARATOR)
        return sam

    def __len__(self) -> int:
        """Number of tokens in the text (separators included)."""
        return len(self._tokens)

    @property
    def num_states(self) -> int:
        """Number of states, root included (at most 2n for n >= 1 tokens)."""
        return len(self._length)

    @property
    def num_transitions(self) -> int:
        """Number of transitions (at most 3n for n tokens)."""
        return sum(len(n) for n in self._next)

    def extend(self, token: int) -> None:
        """Append one token (amortized O(1)): the standard online construction with clones."""
        length, link, nxt, end = self._length, self._link, self._next, self._end
        cur = len(length)
        length.append(length[self._last] + 1)
        link.append(0)
        nxt.append({})
        end.append(len(self._tokens))
        self._tokens.append(token)
        p = self._last
        while p != -1 and token not in nxt[p]:
            nxt[p][token] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][token]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                link[cur] = self._clone(p, q, token)
        self._last = cur

    def _clone(self, p: int, q: int, token: int) -> int:
        """Split q: a clone takes q's strings of length <= length[p] + 1; returns the clone."""
        length, link, nxt = self._length, self._link, self._next
        clone = len(length)
        length.append(length[p] + 1)
        link.append(link[q])
        nxt.append(nxt[q].copy())
        self._end.append(self._end[q])
        while p != -1 and nxt[p].get(token) == q:
            nxt[p][token] = clone
            p = link[p]
        link[q] = clone
        return clone

    def extend_many(self, tokens: Iterable[int]) -> None:
        """Append `tokens` in order."""
        for t in tokens:
            self.extend(t)

    def longest_repeated_suffix(self) -> tuple[int, int]:
        """The longest suffix of the text that also ends earlier: (length, first end position).

        This is SAM-Decoding's dynamic match, read in O(1) from the last state's suffix link.
        Returns (0, -1) when no non-empty suffix occurs earlier.
        """
        s = self._link[self._last]
        if s <= 0:
            return 0, -1
        return self._length[s], self._end[s]

    def continuation(self, end: int, max_tokens: int) -> tuple[int, ...]:
        """Up to `max_tokens` tokens after position `end`, stopping at a separator or the end."""
        out = self._tokens[end + 1 : end + 1 + max_tokens]
        for i, t in enumerate(out):
            if t < 0:
                return tuple(out[:i])
        return tuple(out)

    def advance(self, state: int, length: int, token: int) -> tuple[int, int]:
        """One matching step: from the match (state, length) of a stream, append `token`.

        Returns the (state, length) of the longest suffix of stream + [token] that is a
        substring of the text. Amortized O(1) over a stream. A (state, length) taken before
        the automaton grew stays usable: it is first moved to the state that now holds it.
        """
        link, slen, nxt = self._link, self._length, self._next
        while state > 0 and slen[link[state]] >= length:  # the text grew: state was split
            state = link[state]
        while state > 0 and token not in nxt[state]:
            state = link[state]
            length = slen[state]
        target = nxt[state].get(token)
        if target is None:
            return 0, 0
        return target, length + 1

    def end_of(self, state: int) -> int:
        """First end position of `state`'s strings (-1 for the root)."""
        return self._end[state]

    def save(self, path: str | PathLike[str]) -> None:
        """Write the automaton to `path` as an uncompressed numpy .npz file (exact round trip)."""
        src, tok, dst = [], [], []
        for s, moves in enumerate(self._next):
            src.extend([s] * len(moves))
            tok.extend(moves.keys())
            dst.extend(moves.values())
        with open(path, "wb") as f:
            np.savez(
                f,
                format=np.array(_FORMAT),
                last=np.array(self._last),
                tokens=np.array(self._tokens, dtype=np.int64),
                length=np.array(self._length, dtype=np.int64),
                link=np.array(self._link, dtype=np.int64),
                end=np.array(self._end, dtype=np.int64),
                edge_src=np.array(src, dtype=np.int64),
                edge_token=np.array(tok, dtype=np.int64),
                edge_dst=np.array(dst, dtype=np.int64),
            )

    @classmethod
    def load(cls, path: str | PathLike[str]) -> SuffixAutomaton:
        """Read an automaton written by `save`.

        Raises:
            ValueError: if `path` is not a suffix automaton file of a known format.
        """
        with np.load(path, allow_pickle=False) as data:
            keys = {"format", "last", "tokens", "length", "link", "end"}
            keys |= {"edge_src", "edge_token", "edge_dst"}
            missing = keys - set(data.files)
            if missing:
                raise ValueError(f"{path}: not a SuffixAutomaton file (missing {sorted(missing)})")
            if int(data["format"]) != _FORMAT:
                raise ValueError(f"{path}: format {int(data['format'])}, expected {_FORMAT}")
            sam = cls()
            sam._tokens = data["tokens"].tolist()
            sam._length = data["length"].tolist()
            sam._link = data["link"].tolist()
            sam._end = data["end"].tolist()
            sam._last = int(data["last"])
            sam._next = [{} for _ in sam._length]
            src, tok = data["edge_src"].tolist(), data["edge_token"].tolist()
            for s, t, d in zip(src, tok, data["edge_dst"].tolist(), strict=True):
                sam._next[s][t] = d
        return sam


class SuffixMatch:
    """The longest suffix of a token stream that occurs in an automaton's text.

    Kept incrementally as SAM-Decoding does: `feed` costs amortized O(1), and after feeding
    x_1..x_n, `length` is the largest L such that x_{n-L+1..n} is a substring of the text
    (never spanning a SEPARATOR, since streams hold ids >= 0).
    """

    def __init__(self, automaton: SuffixAutomaton) -> None:
        self.automaton = automaton
        self.state = 0
        self.length = 0

    def reset(self) -> None:
        """Forget the stream (back to the empty match)."""
        self.state = 0
        self.length = 0

    def feed(self, token: int) -> int:
        """Append `token` to the stream; returns the new match length."""
        self.state, self.length = self.automaton.advance(self.state, self.length, token)
        return self.length

    def feed_many(self, tokens: Iterable[int]) -> int:
        """Append `tokens` in order; returns the final match length."""
        for t in tokens:
            self.feed(t)
        return self.length

    @property
    def end(self) -> int:
        """First end position in the text of the matched suffix (-1 when length is 0)."""
        return self.automaton.end_of(self.state) if self.length else -1

    def continuation(self, max_tokens: int) -> tuple[int, ...]:
        """Up to `max_tokens` text tokens after the match's first occurrence (empty if none)."""
        if not self.length:
            return ()
        return self.automaton.continuation(self.end, max_tokens)


class SamDrafter:
    """SAM-Decoding's retrieval draft: static corpus automaton + dynamic sequence automaton.

    `propose` reads the continuation of the longer suffix match (the dynamic automaton wins
    ties, as in SAM-Decoding); if that continuation is empty (a match at a document's end)
    the other match is used. `match_len` is the length of the match that was used, and
    `source` is "<name>:dynamic" or "<name>:static".
    """

    def __init__(
        self,
        corpus: SuffixAutomaton | Iterable[Sequence[int]] | None = None,
        *,
        name: str = "sam",
    ) -> None:
        """Args:
        corpus: a corpus automaton (e.g. from `SuffixAutomaton.load`), or documents to
            build one from with `SuffixAutomaton.from_documents`, or None (dynamic only).
        name: prefix of `Proposal.source`.
        """
        if corpus is None:
            corpus = SuffixAutomaton()
        elif not isinstance(corpus, SuffixAutomaton):
            corpus = SuffixAutomaton.from_documents(corpus)
        self.name = name
        self.corpus = corpus
        self._static = SuffixMatch(corpus)
        self._dynamic = SuffixAutomaton()

    def reset(self, context: Sequence[int]) -> None:
        """Start a sequence: a fresh dynamic automaton over `context`; rematch the corpus."""
        self._dynamic = SuffixAutomaton(context)
        self._static = SuffixMatch(self.corpus)  # rebound, not reset: forks share the corpus
        self._static.feed_many(context)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append committed tokens to the dynamic automaton and to the corpus match."""
        self._dynamic.extend_many(tokens)
        self._static.feed_many(tokens)

    def propose(self, max_tokens: int) -> Proposal:
        """The continuation of the longest suffix match, at most `max_tokens` long."""
        check_max_tokens(max_tokens)
        dyn_len, dyn_end = self._dynamic.longest_repeated_suffix()
        dynamic = (dyn_len, self._dynamic, dyn_end, f"{self.name}:dynamic")
        static = (self._static.length, self.corpus, self._static.end, f"{self.name}:static")
        order = (dynamic, static) if dyn_len >= self._static.length else (static, dynamic)
        for match_len, sam, end, source in order:
            if match_len:
                tokens = sam.continuation(end, max_tokens)
                if tokens:
                    return Proposal(tokens, match_len, source)
        return Proposal.empty(self.name)


@register("sam", "suffix automaton over the prompt and output (SAM-Decoding)")
def _sam(settings: SourceSettings) -> SamDrafter:
    return SamDrafter(name="sam")
