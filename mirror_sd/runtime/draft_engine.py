"""Draft-side operations on a `ModelRunner`: chain drafting, batched branch rollouts, commit.

The engine mirrors the draft cache's path rows as the tokens they hold (`self.rows`), so
syncing with the committed sequence is "roll back to the common prefix, feed the rest".
Branch rows written by a rollout lie beyond `len(self.rows)` and are never mistaken
for path rows: they become path rows only through `commit_branch`.
All of this runs on the draft pipeline's worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mirror_sd.devices.base import DeviceError, ModelRunner, fill
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.runtime.acceptance import Sampling, probs, sample
from mirror_sd.runtime.autoregressive import positions
from mirror_sd.runtime.branches import Branch
from mirror_sd.runtime.draft_policy import NEVER_STOP, DraftPolicy


@dataclass
class Draft:
    """1..γ proposed tokens and the distributions q they were drawn from (None when greedy).

    Fewer than γ tokens when a draft-length policy stopped drafting early.
    """

    tokens: list[int]
    q: torch.Tensor | None  # (len(tokens), V) or None (greedy, or a deterministic proposal)
    source: str = "draft"  # draft | branch | a retrieval source's name


@dataclass
class Rollout:
    branch: Branch
    draft: Draft  # the m ≤ γ tokens r_1..r_m after the branch token
    rows: list[int]  # cache rows holding [c, r_1, .., r_{m-1}]: one per token of `draft`


def _causal_inputs(tokens: list[int], start: int):
    """ids, positions (1, T) and the causal mask (1, T, start + T) of rows after `start`."""
    return torch.tensor([tokens]), positions(start, len(tokens)), causal_mask(start, len(tokens))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftEngine:
    def __init__(self, runner: ModelRunner, sampling: Sampling, gen: torch.Generator):
        self.runner = runner
        self.sampling = sampling
        self.gen = gen
        self.rows: list[int] = []  # token held by each valid cache row

    # --- helpers ----------------------------------------------------------------------
    def _check(self, logits: torch.Tensor, n: int) -> torch.Tensor:
        # -inf is a valid logit (a VocabTrim draft's tokens outside its kept set); NaN, +inf
        # or a row without any finite logit is a broken device
        if (
            logits.shape != (n, self.runner.vocab_size)
            or logits.isnan().any()
            or logits.isposinf().any()
            or not logits.amax(-1).isfinite().all()
        ):
            raise DeviceError(
                f"{self.runner.name} returned malformed logits {tuple(logits.shape)} "
                f"(expected ({n}, {self.runner.vocab_size}), finite or -inf, no NaN)"
            )
        return logits

    def _pick(self, logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """(R, V) logits -> one token per row (+ the (R, V) distributions when sampling)."""
        if self.sampling.greedy:
            return logits.argmax(-1).tolist(), None
        q = probs(logits, self.sampling)
        return [sample(q[r], self.gen) for r in range(q.shape[0])], q

    @staticmethod
    def _stops(policy: DraftPolicy, logits: torch.Tensor, q: torch.Tensor | None) -> list[bool]:
        """Per row: does drafting stop after the token just picked from it? The policy reads
        the q the token was sampled from, or the raw softmax when greedy (see draft_policy)."""
        if not policy.active:
            return [False] * logits.shape[0]
        stop = policy.stops_logits(logits) if q is None else policy.stops(q)
        return stop.tolist()

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Append tokens causally after the valid rows; returns their logits (T, V)."""
        start, t = self.runner.length, len(tokens)
        ids, pos, mask = _causal_inputs(tokens, start)
        logits = self._check(self.runner.forward(ids, pos, mask), t)
        self.rows.extend(tokens)
        return logits

    def _feed_last(self, tokens: list[int]) -> torch.Tensor:
        """`_feed`, returning only the last row's logits (1, V): the rows before it (a prompt,
        after a prefill) go through `fill`, which skips the LM head where the runner can."""
        if len(tokens) > 1:
            head = tokens[:-1]
            fill(self.runner, *_causal_inputs(head, self.runner.length))
            self.rows.extend(head)
        return self._feed(tokens[-1:])

    def sync(self, committed: list[int]) -> None:
        """Roll back to the longest prefix of `committed` the cache holds, keeping at least the
        last committed token unfed (its logits are needed to draft)."""
        keep = min(_common_prefix(self.rows, committed), len(committed) - 1)
        self.runner.rollback(keep)
        del self.rows[keep:]

    # --- the three operations -----------------------------------------------------------
    def draft_chain(
        self, committed: list[int], gamma: int, policy: DraftPolicy = NEVER_STOP
    ) -> Draft:
        """Vanilla drafting: up to γ tokens continuing `committed`, one draft forward each.

        Stops early when `policy` says so; the token that triggered the stop is still
        proposed but not fed, so the cache holds committed + d_1..d_{m-1} for m tokens.
        """
        self.sync(committed)
        logits = self._feed_last(committed[len(self.rows) :])
        tokens, qs = [], []
        for step in range(gamma):
            tok, q = self._pick(logits)
            tokens += tok
            qs.append(q)
            if step + 1 == gamma or self._stops(policy, logits, q)[0]:
                break
            logits = self._feed(tok)
        return Draft(tokens, None if qs[0] is None else torch.cat(qs))

    def rollout(
        self,
        committed: list[int],
        block: list[int],
        branches: list[Branch],
        gamma: int,
        policy: DraftPolicy = NEVER_STOP,
    ) -> list[Rollout]:
        """Roll out up to γ tokens for every branch in one batched, tree-masked forward per step.

        Branch (j, c) sees committed + block[:j] and then its own rows. Missing path rows
        (usually d_γ) are fed first as a causal chain that the depth-j branches share.
        `policy` bounds each branch independently: a branch that stops keeps its last token
        but is not fed again, so later steps run on the still-active branches only and the
        loop ends when none is left. Either way a branch of m tokens owns exactly m rows.
        Returns one `Rollout` per branch, in the order of `branches` (the scheduler relies on it).
        """
        n, path = len(committed), committed + block
        self.sync(path)
        start = len(self.rows)
        chain = path[start:]  # path rows not cached yet
        b = len(branches)
        own: list[list[int]] = [[] for _ in range(b)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(b)]
        outs: list[list[int]] = [[] for _ in range(b)]
        feed = [br.token for br in branches]  # the token each branch feeds next
        active = list(range(b))  # branches still drafting, in feeding order
        for step in range(gamma):
            if not active:
                break
            lead = chain if step == 0 else []
            rows = lead + [feed[k] for k in active]
            base, t = self.runner.length, len(rows)
            pos, mask = self._tree_inputs(
                n, start, base, len(lead), [(branches[k], own[k]) for k in active], step
            )
            logits = self._check(self.runner.forward(torch.tensor([rows]), pos, mask), t)
            if step == 0:
                self.rows.extend(chain)
            mine = logits[len(lead) :]
            picked, q = self._pick(mine)
            stops = self._stops(policy, mine, q)
            still = []
            for slot, k in enumerate(active):
                own[k].append(base + len(lead) + slot)
                outs[k].append(picked[slot])
                if q is not None:
                    qs[k].append(q[slot : slot + 1])
                if not stops[slot]:
                    feed[k] = picked[slot]
                    still.append(k)
            active = still
        return [
            Rollout(br, Draft(outs[k], torch.cat(qs[k]) if qs[k] else None), own[k])
            for k, br in enumerate(branches)
        ]

    @staticmethod
    def _tree_inputs(
        n: int, start: int, base: int, lead: int, fed: list[tuple[Branch, list[int]]], step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (1, T) and the boolean tree mask (1, T, base + T) of one rollout step.

        `lead` chain rows come first (causal over the path, positions from `start`), then one
        row per fed branch: it sees the path up to its depth, its own earlier rows and itself.
        """
        t = lead + len(fed)
        mask = torch.zeros(1, t, base + t, dtype=torch.bool)
        pos = torch.empty(1, t, dtype=torch.long)
        for i in range(lead):
            mask[0, i, : base + i + 1] = True
            pos[0, i] = start + i
        for slot, (br, rows) in enumerate(fed):
            i = lead + slot
            visible_path = n + br.depth  # rows [0, n + j) hold committed + d_1..d_j
            mask[0, i, : min(visible_path, start)] = True
            if visible_path > start:  # part of the path came in as chain rows this step
                mask[0, i, start:visible_path] = True
            mask[0, i, rows] = True
            mask[0, i, base + i] = True
            pos[0, i] = n + br.depth + step
        return pos, mask

    def commit_branch(self, committed_len_before: int, accepted: int, rollout: Rollout) -> None:
        """Keep the accepted path and the winning branch's rows (compaction); drop the rest.

        After this the cache holds committed + d_1..d_a + c + r_1..r_{m-1}: exactly the state
        after drafting the next block r_1..r_m (m ≤ γ when a draft-length policy stopped it).
        """
        start = committed_len_before + accepted
        self.runner.keep(start, rollout.rows)
        del self.rows[start:]
        self.rows += [rollout.branch.token] + rollout.draft.tokens[:-1]
