"""`DraftEngine`: the draft model's side of the round, for every live sequence of a batch
(batch 1 is a batch of one), one draft forward per step.

The draft cache is a `PackedCache`: each chain step feeds one token per still-drafting
sequence in a single forward. Each sequence has its own sampling settings, random generator
and draft-length decision (`DraftPolicy`). `rollout` (mirror mode) rolls out every sequence's
branches in one tree-masked forward per step; a branch's rows belong to a per-sequence branch
owner until `commit_branch` hands the winner's rows to the sequence (no copy) and
`end_rollouts` turns the rest into holes. Runs on the draft pipeline's worker thread (commit
and end: while it is idle).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

from mirror_sd.devices.base import DeviceError, ModelRunner
from mirror_sd.runtime.acceptance import Sampling, probs, sample
from mirror_sd.runtime.branches import Branch
from mirror_sd.runtime.draft_policy import NEVER_STOP, DraftPolicy
from mirror_sd.runtime.packing import PackedCache, common_prefix

Key = tuple[Hashable, int]  # (sequence, branch number) in a rollout


@dataclass
class Draft:
    """1..γ proposed tokens and the distributions q they were drawn from (None when greedy).

    Fewer than γ tokens when a draft-length policy stopped drafting early.
    """

    tokens: list[int]
    q: torch.Tensor | None  # (len(tokens), V) or None (greedy, or a deterministic proposal)
    source: str = "draft"  # draft | branch | target | a retrieval source's name
    # per token: the draft's next-best tokens at that depth (greedy chains asked for sibling
    # leaves, `chain(..., siblings)`); the target verifies them as a token tree. None: a chain
    alts: list[list[int]] | None = None


def depth_siblings(siblings: int | Sequence[int], depth: int) -> int:
    """Sibling leaves at `depth` (0-based) of a tree shape (an int: the same at every depth);
    0 past its end."""
    if isinstance(siblings, int):
        return siblings
    return siblings[depth] if depth < len(siblings) else 0


@dataclass
class Rollout:
    branch: Branch
    draft: Draft  # the m ≤ γ tokens r_1..r_m after the branch token
    rows: list[int]  # the sequence's branch rows holding [c, r_1, .., r_{m-1}]


class DraftEngine:
    def __init__(self, runner: ModelRunner, cache: PackedCache | None = None,
                 streams: Sequence[int] = ()):  # fmt: skip
        """`cache`: the runner's packed cache kept from earlier generations (prefix caching,
        `Plan.packed_cache`); a new, empty one when None. `streams`: the input ids of the
        draft's stream rows (speculative streaming, `graphs.streams`); empty: one token per
        chain forward."""
        self.runner = runner
        self.cache = cache if cache is not None else PackedCache(runner)
        self.streams = list(streams)
        self.forwards = 0  # chain forwards and the tokens they drafted (tokens per forward)
        self.drafted = 0
        self.gens: dict[Hashable, torch.Generator] = {}
        self.samplings: dict[Hashable, Sampling] = {}

    def add(self, sid: Hashable, sampling: Sampling, gen: torch.Generator,
            prompt: Sequence[int] | None = None) -> None:  # fmt: skip
        """A sequence joins; its tokens are picked under `sampling`, drawn with `gen`; with
        its `prompt`, it takes over a retained prefix of the draft's cache (prefix caching)."""
        self.cache.add(sid, prompt)
        self.samplings[sid], self.gens[sid] = sampling, gen

    def drop(self, sid: Hashable) -> None:
        """A sequence left: its draft rows become holes."""
        self.cache.drop(sid)
        del self.gens[sid], self.samplings[sid]

    def restart(self) -> None:
        """After a device error: an empty cache for the same sequences, each fed again from
        its committed tokens at its next drafting step (`_sync`)."""
        self.cache = PackedCache(self.runner, retain=self.cache.retain)
        for sid in self.gens:
            self.cache.add(sid)

    def rows(self, sid: Hashable) -> list[int]:
        """The tokens the draft cache holds for the sequence, in order."""
        return list(self.cache.tokens[sid])

    # --- helpers ---------------------------------------------------------------------------
    def _check(self, logits: torch.Tensor) -> torch.Tensor:
        """Malformed logits (shape, NaN, +inf, no finite value) are a device failure. -inf is
        valid (a VocabTrim draft's tokens outside its kept set)."""
        if (
            logits.ndim != 2
            or logits.shape[1] != self.runner.vocab_size
            or logits.isnan().any()
            or logits.isposinf().any()
            or not logits.amax(-1).isfinite().all()
        ):
            raise DeviceError(
                f"{self.runner.name} returned malformed logits {tuple(logits.shape)} "
                f"(expected (T, {self.runner.vocab_size}), finite or -inf, no NaN)"
            )
        return logits

    def _pick(self, sids: list[Hashable], rows: torch.Tensor) -> tuple[list[int], list]:
        """Logits (R, V), row r for sequence sids[r] -> one token per row and the (1, V) q it
        was drawn from (None where greedy), under each sequence's sampling and generator."""
        tokens, qs = [], []
        for r, sid in enumerate(sids):
            sampling = self.samplings[sid]
            if sampling.greedy:
                tokens.append(int(rows[r].argmax()))
                qs.append(None)
            else:
                q = probs(rows[r : r + 1], sampling)
                tokens.append(sample(q[0], self.gens[sid]))
                qs.append(q)
        return tokens, qs

    @staticmethod
    def _stops(policy: DraftPolicy, rows: torch.Tensor, qs: list) -> list[bool]:
        """Per row: does drafting stop after the token just picked from it? One policy call
        per step; it reads the q a token was sampled from, or the raw softmax where greedy
        (see draft_policy)."""
        if not policy.active:
            return [False] * rows.shape[0]
        if all(q is None for q in qs):
            return policy.stops_logits(rows).tolist()
        read = [torch.softmax(rows[r].float(), -1)[None] if q is None else q.float()
                for r, q in enumerate(qs)]  # fmt: skip
        return policy.stops(torch.cat(read)).tolist()

    def _sync(self, sid: Hashable, path: list[int]) -> list[int]:
        """Keep the longest cached prefix of `path` (the last token always unfed); returns
        the tokens of `path` not cached yet."""
        held = self.cache.tokens[sid]
        self.cache.truncate(sid, min(common_prefix(held, path), len(path) - 1))
        return path[len(self.cache.tokens[sid]) :]

    # --- chain drafting --------------------------------------------------------------------
    def chain(
        self, committed: Mapping[Hashable, list[int]], gamma: int,
        policy: DraftPolicy = NEVER_STOP, siblings: int | Sequence[int] = (),
    ) -> dict[Hashable, Draft]:  # fmt: skip
        """Up to γ draft tokens continuing each sequence's committed tokens.

        Each sequence first syncs (keeps the longest cached prefix of its committed tokens,
        leaving the last one unfed); tokens missing before the last are filled one sequence at
        a time (a prompt), then every step is one packed forward over the sequences still
        drafting. A sequence whose policy stops keeps the token that triggered the stop
        proposed but unfed, so its cache holds committed + d_1..d_{m-1} for m tokens.
        With `siblings` (leaves per depth, none past its end) a greedy sequence's draft also
        lists, per token at depth j, the next siblings[j] best tokens of the same draft row
        (`Draft.alts`: sibling leaves of a token tree; read from logits the chain computes).
        """
        feed: dict[Hashable, list[int]] = {}
        for sid, seq in committed.items():
            missing = self._sync(sid, seq)
            self.cache.fill(sid, missing[:-1])
            feed[sid] = missing[-1:]
        if self.streams:
            return self._chain_streamed({s: f[0] for s, f in feed.items()}, gamma, policy,
                                        siblings)  # fmt: skip
        alts: dict[Hashable, list[list[int]]] = {sid: [] for sid in committed}
        tokens: dict[Hashable, list[int]] = {sid: [] for sid in committed}
        qs: dict[Hashable, list[torch.Tensor]] = {sid: [] for sid in committed}
        active = list(committed)
        for step in range(gamma):
            self.forwards, self.drafted = self.forwards + 1, self.drafted + len(active)
            logits = self.cache.forward({sid: feed[sid] for sid in active})
            last = torch.cat([self._check(logits[sid])[-1:] for sid in active])  # (R, V)
            picked, q = self._pick(active, last)
            stops = self._stops(policy, last, q)
            still = []
            for r, sid in enumerate(active):
                if q[r] is not None:
                    qs[sid].append(q[r])
                tokens[sid].append(picked[r])
                alts[sid].append(self._alts(sid, last[r], picked[r],
                                            depth_siblings(siblings, step)))  # fmt: skip
                if step + 1 < gamma and not stops[r]:
                    feed[sid] = [picked[r]]
                    still.append(sid)
            active = still
            if not active:
                break
        return {sid: _draft(tokens[sid], qs[sid], alts[sid]) for sid in committed}

    def _chain_streamed(self, feed: dict[Hashable, int], gamma: int, policy: DraftPolicy,
                        siblings: int | Sequence[int] = ()) -> dict[Hashable, Draft]:  # fmt: skip
        """`chain` with stream rows (speculative streaming): each forward feeds a sequence's
        unfed token, the guesses the previous forward's streams made, and stream rows after
        them. Tokens are picked from the real rows in order, exactly as the one-token chain
        picks them (same sampling, same generator draws); a pick that equals the next guess
        makes that guess's row valid and the next pick is read from it. Rows past the first
        wrong guess, and every stream row, are dropped; the streams' argmaxes become the next
        guesses only when every guess held. Output: the one-token chain's (up to the
        rounding of a multi-row forward), in fewer forwards."""
        tokens: dict[Hashable, list[int]] = {sid: [] for sid in feed}
        qs: dict[Hashable, list[torch.Tensor]] = {sid: [] for sid in feed}
        guesses: dict[Hashable, list[int]] = {sid: [] for sid in feed}
        alts: dict[Hashable, list[list[int]]] = {sid: [] for sid in feed}
        active, cache = list(feed), self.cache
        while active:
            plan = {}  # sid -> (real rows, stream ids)
            for sid in active:
                left = gamma - len(tokens[sid])
                g = guesses[sid][: left - 1]
                plan[sid] = ([feed[sid], *g], self.streams[: max(0, left - 1 - len(g))])
                cache.add(_streams(sid), transient=True)
            t = sum(len(r) + len(s) for r, s in plan.values())
            cache.reserve(t)
            owners, ids, pos, mask = self._stream_rows(plan, t)
            logits = self._check(cache.run_rows(owners, ids, pos, mask))
            self.forwards += 1
            still, at = [], 0
            for sid in active:
                real, streams = plan[sid]
                held = len(cache.tokens[sid]) - len(real)  # rows before this forward
                i = 0
                while True:  # pick from real row i
                    row = logits[at + i : at + i + 1]
                    picked, q = self._pick([sid], row)
                    tokens[sid].append(picked[0])
                    depth = len(tokens[sid]) - 1
                    alts[sid].append(self._alts(sid, row[0], picked[0],
                                                depth_siblings(siblings, depth)))  # fmt: skip
                    if q[0] is not None:
                        qs[sid].append(q[0])
                    done = len(tokens[sid]) == gamma or self._stops(policy, row, q)[0]
                    if done or i + 1 >= len(real) or real[i + 1] != picked[0]:
                        break
                    i += 1
                self.drafted += i + 1
                cache.truncate(sid, held + i + 1)  # rows whose input was confirmed
                cache.drop(_streams(sid))
                confirmed_all = i + 1 == len(real)
                s0 = at + len(real)
                guesses[sid] = (logits[s0 : s0 + len(streams)].argmax(-1).tolist()
                                if confirmed_all and not done else [])  # fmt: skip
                at += len(real) + len(streams)
                if not done:
                    feed[sid] = tokens[sid][-1]
                    still.append(sid)
            active = still
        return {sid: _draft(tokens[sid], qs[sid], alts[sid]) for sid in feed}

    def _alts(self, sid: Hashable, row: torch.Tensor, picked: int, siblings: int) -> list[int]:
        """The `siblings` best tokens of a draft row other than the one picked (greedy
        sequences only: a sampled token's siblings would need their own law)."""
        if not siblings or not self.samplings[sid].greedy:
            return []
        top = row.topk(min(siblings + 1, row.shape[-1])).indices.tolist()
        return [t for t in top if t != picked][:siblings]

    def _stream_rows(self, plan: Mapping[Hashable, tuple[list[int], list[int]]],
                     t: int) -> tuple[list[Hashable], list[int], list[int], torch.Tensor]:  # fmt: skip
        """Owners, ids, positions and mask (1, T, S + T) of one streamed chain forward: per
        sequence its real rows (causal over its columns) then its stream rows, which see the
        sequence, its real rows and the streams before them; stream j sits at the last real
        row's position + j."""
        cache, s = self.cache, self.runner.length
        mask = torch.zeros(1, t, s + t, dtype=torch.bool)
        owners, ids, pos = [], [], []
        for sid, (real, streams) in plan.items():
            cols, n0, first = cache.cols[sid], len(cache.tokens[sid]), len(ids)
            for k, tok in enumerate([*real, *streams]):
                i = len(ids)
                mask[0, i, cols] = True
                mask[0, i, s + first : s + i + 1] = True
                owners.append(sid if k < len(real) else _streams(sid))
                ids.append(tok)
                pos.append(n0 + k)
        return owners, ids, pos, mask

    # --- mirror: branch rollouts -----------------------------------------------------------
    def rollout(
        self,
        work: Mapping[Hashable, tuple[list[int], list[int], list[Branch]]],
        gamma: int,
        policy: DraftPolicy = NEVER_STOP,
    ) -> dict[Hashable, list[Rollout]]:
        """{sequence: (committed, block, branches)} -> {sequence: one Rollout per branch, in
        the order given (the scheduler relies on it)}.

        Branch (j, c) sees committed + block[:j] and its own rows, at positions n + j + step;
        missing path rows (usually d_γ) go first as causal rows; `policy` stops each branch
        on its own (a stopped branch keeps its last token unfed: a branch of m tokens owns m
        rows). `Rollout.rows` index the sequence's branch rows.
        """
        cache, n_of, chain = self.cache, {}, {}
        for sid, (committed, block, _) in work.items():
            n_of[sid], chain[sid] = len(committed), self._sync(sid, committed + block)
            cache.add(_branches(sid), transient=True)
        keys = [(sid, k) for sid, (_, _, brs) in work.items() for k in range(len(brs))]
        br = {(sid, k): work[sid][2][k] for sid, k in keys}
        own: dict[Key, list[int]] = {key: [] for key in keys}  # its rows: branch-row indices
        outs: dict[Key, list[int]] = {key: [] for key in keys}
        qs: dict[Key, list[torch.Tensor]] = {key: [] for key in keys}
        feed = {key: br[key].token for key in keys}
        active = list(keys)
        for step in range(gamma):
            if not active:
                break
            lead = chain if step == 0 else {}
            t = sum(map(len, lead.values())) + len(active)
            cache.reserve(t)
            owners, ids, pos, mask = self._tree_rows(lead, active, br, own, feed, n_of, step, t)
            nxt = {sid: len(cache.cols[_branches(sid)]) for sid in work}  # next branch row index
            logits = self._check(cache.run_rows(owners, ids, pos, mask))
            mine = logits[len(ids) - len(active) :]  # (R, V): one row per active branch
            picked, q = self._pick([key[0] for key in active], mine)
            stops = self._stops(policy, mine, q)
            still = []
            for slot, key in enumerate(active):
                if q[slot] is not None:
                    qs[key].append(q[slot])
                own[key].append(nxt[key[0]])
                nxt[key[0]] += 1
                outs[key].append(picked[slot])
                if not stops[slot]:
                    feed[key] = picked[slot]
                    still.append(key)
            active = still
        return {
            sid: [Rollout(b, Draft(outs[(sid, k)], torch.cat(qs[(sid, k)]) if qs[(sid, k)]
                                   else None), own[(sid, k)])
                  for k, b in enumerate(brs)]
            for sid, (_, _, brs) in work.items()
        }  # fmt: skip

    def _tree_rows(
        self,
        lead: Mapping[Hashable, list[int]],
        active: list[Key],
        br: Mapping[Key, Branch],
        own: Mapping[Key, list[int]],
        feed: Mapping[Key, int],
        n_of: Mapping[Hashable, int],
        step: int,
        t: int,
    ) -> tuple[list[Hashable], list[int], list[int], torch.Tensor]:
        """Owners, ids, positions and the tree mask (1, T, S + T) of one rollout step: each
        sequence's missing path rows (causal), then one row per active branch (key: sequence,
        branch number), which sees its path up to its depth, its own rows and itself."""
        cache, s = self.cache, self.runner.length
        mask = torch.zeros(1, t, s + t, dtype=torch.bool)
        owners, ids, pos = [], [], []
        path_cols = {}
        for sid, rows in lead.items():
            base = cache.cols[sid]
            new_cols = []
            for tok in rows:
                i = len(ids)
                mask[0, i, base + new_cols] = True
                mask[0, i, s + i] = True
                owners.append(sid), ids.append(tok), pos.append(len(base) + len(new_cols))
                new_cols.append(s + i)
            path_cols[sid] = base + new_cols
        for key in active:
            sid, i = key[0], len(ids)
            n, depth = n_of[sid], br[key].depth
            visible = path_cols.get(sid, cache.cols[sid])[: n + depth]
            mine = [cache.cols[_branches(sid)][k] for k in own[key]]
            mask[0, i, visible + mine] = True
            mask[0, i, s + i] = True
            owners.append(_branches(sid)), ids.append(feed[key]), pos.append(n + depth + step)
        return owners, ids, pos, mask

    def commit_branch(self, sid: Hashable, committed_len_before: int, accepted: int,
                      rollout: Rollout) -> None:  # fmt: skip
        """Keep the accepted path and the winning branch's rows (they change owner, no copy):
        the sequence's draft rows are then committed + d_1..d_a + c + r_1..r_{m-1}, exactly
        the state after drafting the next block r_1..r_m."""
        self.cache.truncate(sid, committed_len_before + accepted)
        self.cache.adopt(sid, _branches(sid), rollout.rows)

    def end_rollouts(self) -> None:
        """Every sequence's remaining branch rows become holes."""
        for key in [k for k in self.cache.cols if isinstance(k, _BranchKey)]:
            self.cache.drop(key)


def _draft(tokens: list[int], qs: list[torch.Tensor], alts: list[list[int]]) -> Draft:
    """A chain's Draft: q stacked when sampled; `alts` kept only when some token has one."""
    return Draft(tokens, torch.cat(qs) if qs else None,
                 alts=alts if any(alts) else None)  # fmt: skip


class _BranchKey(tuple):
    """The owner of a sequence's branch rows in the packed draft cache."""


def _branches(sid: Hashable) -> _BranchKey:
    return _BranchKey(("branches", sid))


def _streams(sid: Hashable) -> _BranchKey:
    """The owner of a sequence's stream rows in one streamed chain forward (dropped after)."""
    return _BranchKey(("streams", sid))
