"""`PackedCache`: several sequences in one runner's KV cache, told apart by the mask.

A batch runs through the *same* graphs and runners as batch 1 (`ModelRunner.forward` on
ids (1, T)): the new rows of every live sequence are packed one after the other into one
block of T = Σ t_s rows, and each cache column belongs to one sequence (`owner`) or to none
(a hole). The boolean mask lets a row see only its own sequence's columns and, among the new
rows, its own sequence's earlier rows; positions are per sequence (the sequence's own token
count), so RoPE, attention and therefore each sequence's logits are those of batch 1 up to
float rounding. No realignment per round: a rejected draft row or a departed sequence just
becomes a hole; `compact` (the cache's own `keep`) squeezes holes out only when they fill
more than half of the written columns or a block would not fit. See docs/runtime.md, *Batches*.

Prefix caching (`retain`): a sequence that leaves keeps its columns as a *retained entry*
(its tokens and their rows, still owned by its slot, so no live row sees them). A sequence
that joins with `add(sid, tokens)` takes over the retained entry sharing the longest prefix
with its tokens: those columns become its first rows, and only the rest of its prompt is
prefilled (a chat's next turn resends the history; a server's clients resend one system
prompt). Entries are evicted oldest first when rows are needed. The cache can outlive one
round loop (`Plan` keeps it between generations); `usable()` says whether its bookkeeping
still matches the runner (a runner call that raised leaves it unusable: start afresh).

All methods run on the owning pipeline's worker thread (one writer at a time).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from mirror_sd.devices.base import ModelRunner, fill
from mirror_sd.graphs.kv_cache import CacheFullError
from mirror_sd.graphs.masks import tree_mask

HOLE = -1  # owner of a column no sequence holds (rejected row, departed sequence)
MAX_HOLE_SHARE = 0.5  # compact before a forward when holes exceed this share of the columns


class PackedCache:
    """Per-sequence columns of one runner's cache (see module doc). Sequences are keyed by
    any hashable id; `tokens[sid][k]` is the token held in column `cols[sid][k]`, at
    position k of that sequence."""

    def __init__(self, runner: ModelRunner, retain: bool = False):
        self.runner, self.retain = runner, retain
        self.owner = torch.full((runner.max_len,), HOLE, dtype=torch.long)  # column -> slot
        self.cols: dict[Hashable, list[int]] = {}
        self.tokens: dict[Hashable, list[int]] = {}
        self._slot: dict[Hashable, int] = {}  # sequence id -> integer owner id
        self._slots = 0  # owner ids handed out (never reused)
        self.compactions = 0  # realignments (a `keep` over the cache) and the rows they moved
        self.moved_rows = 0
        self.compact_s = 0.0  # seconds spent compacting
        # prefix caching: slot -> (columns, tokens) of departed sequences, oldest first
        self.retained: OrderedDict[int, tuple[list[int], list[int]]] = OrderedDict()
        self.evicted = 0  # retained entries dropped to make room
        self._busy = False  # a runner call in flight (or one that raised)
        self._transient: set[Hashable] = set()  # sequences never retained (`add`)
        runner.rollback(0)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Around every runner call that writes rows: an exception leaves the cache unusable."""
        self._busy = True
        yield
        self._busy = False

    def usable(self) -> bool:
        """The bookkeeping matches the runner: no runner call raised, nobody else moved it."""
        written = int((self.owner != HOLE).nonzero().max()) + 1 if (self.owner != HOLE).any() else 0
        return not self._busy and written <= self.runner.length

    def leave_all(self) -> None:
        """Every live sequence leaves (a round loop ended without dropping them: cancelled);
        with `retain` their rows become retained entries."""
        for sid in list(self.cols):
            self.drop(sid)

    # --- sequences -------------------------------------------------------------------------
    def add(self, sid: Hashable, tokens: Sequence[int] | None = None,
            transient: bool = False) -> int:  # fmt: skip
        """Start tracking a sequence. With `retain` and its `tokens` (the prompt), it takes
        over the retained entry sharing the longest prefix with them, at most all but the
        last token (whose logits the caller needs): returns how many rows it reuses (0: it
        starts with no cached rows). A `transient` sequence (a draft's branch rows, which are
        no prefix from position 0) is never retained when it leaves."""
        if sid in self._slot:
            raise ValueError(f"sequence {sid!r} is already in this cache")
        if transient:
            self._transient.add(sid)
        best, reuse = None, 0
        if self.retain and tokens:
            limit = len(tokens) - 1
            for slot, (_, held) in self.retained.items():
                n = common_prefix(held, tokens, limit)
                if n > reuse:
                    best, reuse = slot, n
        if best is None:
            self._slot[sid], self._slots = self._slots, self._slots + 1
            self.cols[sid], self.tokens[sid] = [], []
            return 0
        cols, held = self.retained.pop(best)
        self._slot[sid] = best
        self.cols[sid], self.tokens[sid] = cols[:reuse], held[:reuse]
        self.owner[cols[reuse:]] = HOLE
        self._shrink()
        return reuse

    def drop(self, sid: Hashable) -> None:
        """The sequence left the batch: its columns become holes, or, with `retain`, a
        retained entry (the newest) that a later sequence with the same prefix can take."""
        if self.retain and self.tokens[sid] and sid not in self._transient:
            self.retained[self._slot[sid]] = (self.cols[sid], self.tokens[sid])
        else:
            self.truncate(sid, 0)
        del self.cols[sid], self.tokens[sid], self._slot[sid]
        self._transient.discard(sid)

    def evict(self) -> bool:
        """Drop the oldest retained entry (its columns become holes); False when none is left."""
        if not self.retained:
            return False
        _, (cols, _) = self.retained.popitem(last=False)
        self.owner[cols] = HOLE
        self.evicted += 1
        self._shrink()
        return True

    def truncate(self, sid: Hashable, n: int) -> None:
        """Keep the sequence's first n cached tokens; its later columns become holes, and the
        written length shrinks past any trailing holes (a rollback: a pointer move)."""
        cols = self.cols[sid]
        if not 0 <= n <= len(cols):
            raise ValueError(f"truncate sequence {sid!r} to {n} outside [0, {len(cols)}]")
        if n == len(cols):
            return
        self.owner[cols[n:]] = HOLE
        del cols[n:], self.tokens[sid][n:]
        self._shrink()

    def _shrink(self) -> None:
        """The written length moves back past trailing holes (a rollback: a pointer move)."""
        held = (self.owner[: self.runner.length] != HOLE).nonzero()
        self.runner.rollback(int(held[-1]) + 1 if held.numel() else 0)

    @property
    def holes(self) -> int:
        """Written columns that no sequence holds and no retained entry keeps."""
        kept = sum(len(c) for c, _ in self.retained.values())
        return self.runner.length - sum(len(c) for c in self.cols.values()) - kept

    # --- running rows ----------------------------------------------------------------------
    def inputs(
        self, new: Mapping[Hashable, Sequence[int]],
        trees: Mapping[Hashable, Sequence[int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """ids, position_ids (1, T) and mask (1, T, S + T) for the new tokens of each sequence,
        packed in `new`'s order after the S written columns. A sequence in `trees` gives its
        rows' parents (index among its new rows, -1 for the first): its rows form a token
        tree (each sees its ancestors and itself, at its position + depth) instead of a chain."""
        s = self.runner.length
        ids = [t for toks in new.values() for t in toks]
        who = torch.tensor([self._slot[sid] for sid, toks in new.items() for _ in toks])  # (T,)
        past = self.owner[:s][None, :] == who[:, None]  # (T, S): own columns only
        t = len(ids)
        own = (who[:, None] == who[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
        pos, at = [], 0
        for sid, toks in new.items():
            n, parents = len(self.tokens[sid]), (trees or {}).get(sid)
            if parents is None:
                pos += [n + i for i in range(len(toks))]
            else:
                block = tree_mask(0, parents)[0]  # (t_s, t_s): ancestors and itself
                own[at : at + len(toks), at : at + len(toks)] = block
                pos += [n + int(d) - 1 for d in block.sum(-1)]  # depth = ancestors
            at += len(toks)
        mask = torch.cat([past, own], dim=1)[None]  # (1, T, S + T)
        return torch.tensor([ids]), torch.tensor([pos]), mask

    def forward(self, new: Mapping[Hashable, Sequence[int]],
                trees: Mapping[Hashable, Sequence[int]] | None = None
                ) -> dict[Hashable, torch.Tensor]:  # fmt: skip
        """Append each sequence's new tokens in one forward (a token tree for a sequence in
        `trees`, see `inputs`); returns its logits (t_s, V). A tree's rows are recorded in
        row order: `prune` keeps the accepted path's."""
        new = {sid: list(toks) for sid, toks in new.items() if toks}
        self._room(sum(len(t) for t in new.values()))
        start = self.runner.length
        with self._writing():
            logits = self.runner.forward(*self.inputs(new, trees))
        return self._split(new, logits, start)  # (T, V) rows

    def prune(self, sid: Hashable, start: int, keep: Sequence[int]) -> None:
        """Of the sequence's rows from its `start`-th on (a token tree's block), keep the
        `keep`-th ones (increasing: a root-to-node path), in order; the rest become holes.
        The kept rows were written at their path positions, so they read as a chain."""
        cols, toks = self.cols[sid], self.tokens[sid]
        if list(keep) != sorted(set(keep)) or (
            keep and not 0 <= keep[0] <= keep[-1] < len(cols) - start
        ):
            raise ValueError(
                f"prune {sid!r}: rows {list(keep)} are not increasing rows of its block"
            )
        block, kept = cols[start:], set(keep)
        self.owner[[c for i, c in enumerate(block) if i not in kept]] = HOLE
        cols[start:] = [block[i] for i in keep]
        toks[start:] = [toks[start + i] for i in keep]
        self._shrink()

    def forward_prefix(self, new: Mapping[Hashable, Sequence[int]],
                       trees: Mapping[Hashable, Sequence[int]] | None = None) -> torch.Tensor:  # fmt: skip
        """A `SplitRunner`'s prefix on the packed new tokens (token trees as in `forward`) ->
        hidden (1, T, D); the rows are recorded by the `forward_suffix` that must follow (no
        compaction in between)."""
        new = {sid: list(toks) for sid, toks in new.items() if toks}
        self._room(sum(len(t) for t in new.values()))
        inputs = self.inputs(new, trees)
        self._pending = (new, self.runner.length, inputs)
        self._busy = True  # until the suffix records the rows
        return self.runner.forward_prefix(*inputs)

    def forward_suffix(self, hidden: torch.Tensor) -> dict[Hashable, torch.Tensor]:
        """The suffix after `forward_prefix`: each sequence's logits (t_s, V)."""
        new, start, (_, pos, mask) = self._pending
        with self._writing():
            logits = self.runner.forward_suffix(hidden, pos, mask)  # (T, V)
        return self._split(new, logits, start)

    def split(self, new: Mapping[Hashable, Sequence[int]], rows: torch.Tensor) -> dict:
        """Rows (T, ...) of a packed block -> {sequence: its rows}, in `new`'s order."""
        out, r = {}, 0
        for sid, toks in new.items():
            if toks:
                out[sid], r = rows[r : r + len(toks)], r + len(toks)
        return out

    def _split(self, new: dict, logits: torch.Tensor, start: int) -> dict:
        out, row = {}, 0
        for sid, toks in new.items():
            out[sid] = logits[row : row + len(toks)]
            self._record(sid, toks, start + row)
            row += len(toks)
        return out

    # --- explicit rows (tree-masked branch rollouts) ---------------------------------------
    def reserve(self, t: int) -> None:
        """Make room for t rows now (compacting if needed): column numbers read after this
        stay valid for the `run_rows` that follows."""
        self._room(t)

    def run_rows(self, owners: Sequence[Hashable], ids: Sequence[int], pos: Sequence[int],
                 mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """T rows with explicit positions and mask (1, T, S + T), after `reserve(T)`; row i is
        appended to sequence owners[i]'s columns. Returns logits (T, V)."""
        start = self.runner.length
        with self._writing():
            logits = self.runner.forward(torch.tensor([list(ids)]), torch.tensor([list(pos)]), mask)
        for i, (sid, tok) in enumerate(zip(owners, ids, strict=True)):
            self._record(sid, [tok], start + i)
        return logits

    def adopt(self, sid: Hashable, donor: Hashable, picks: Sequence[int]) -> None:
        """Move the donor's picks-th columns (and tokens) to the end of `sid`'s, in order:
        a branch's rows become path rows with no copy."""
        cols = [self.cols[donor][k] for k in picks]
        self.owner[cols] = self._slot[sid]
        self.cols[sid] += cols
        self.tokens[sid] += [self.tokens[donor][k] for k in picks]
        for k in sorted(picks, reverse=True):
            del self.cols[donor][k], self.tokens[donor][k]

    def fill(self, sid: Hashable, tokens: Sequence[int]) -> None:
        """Append one sequence's tokens without logits (a prefill)."""
        tokens = list(tokens)
        if not tokens:
            return
        self._room(len(tokens))
        start = self.runner.length
        with self._writing():
            fill(self.runner, *self.inputs({sid: tokens}))
        self._record(sid, tokens, start)

    def _record(self, sid: Hashable, tokens: list[int], start: int) -> None:
        cols = range(start, start + len(tokens))
        self.owner[start : start + len(tokens)] = self._slot[sid]
        self.cols[sid] += cols
        self.tokens[sid] += tokens

    # --- holes -----------------------------------------------------------------------------
    def _room(self, t: int) -> None:
        """Compact first when T more rows would not fit, or holes are over MAX_HOLE_SHARE."""
        while self.runner.length - self.holes + t > self.runner.max_len and self.evict():
            pass  # retained prefixes make room for live rows, oldest first
        n = self.runner.length
        if n + t > self.runner.max_len or (n and self.holes > MAX_HOLE_SHARE * n):
            self.compact()
        if self.runner.length + t > self.runner.max_len:
            held = self._live_rows()
            raise CacheFullError(
                f"{self.runner.name}: the batch holds {held} rows and needs {t} more, over "
                f"the cache's {self.runner.max_len}: raise max_len or run fewer sequences"
            )

    def compact(self) -> None:
        """Move every held column down over the holes (the cache's `keep`, one gather per
        layer); positions are untouched, so no sequence's logits change."""
        n = self.runner.length
        held = (self.owner[:n] != HOLE).nonzero().flatten().tolist()
        first = next((i for i, c in enumerate(held) if c != i), len(held))
        if first == len(held) and len(held) == n:
            return
        t0 = time.perf_counter()
        with self._writing():
            self.runner.keep(first, held[first:])
        self.compact_s += time.perf_counter() - t0
        self.compactions += 1
        self.moved_rows += len(held) - first
        remap = {c: i for i, c in enumerate(held)}
        self.owner[: len(held)] = self.owner[held].clone()
        self.owner[len(held) : n] = HOLE
        for sid, cols in self.cols.items():
            self.cols[sid] = [remap[c] for c in cols]
        for slot, (cols, toks) in self.retained.items():
            self.retained[slot] = ([remap[c] for c in cols], toks)

    def _live_rows(self) -> int:
        """Columns live sequences hold."""
        return sum(len(c) for c in self.cols.values())


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """Length of the longest common prefix of two token lists (at most `limit`)."""
    n = min(len(a), len(b), len(a) if limit is None else limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
