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

from mirror_sd.devices.base import DeviceError, ModelRunner
from mirror_sd.runtime.acceptance import Sampling, probs, sample
from mirror_sd.runtime.branches import Branch


@dataclass
class Draft:
    """γ proposed tokens and the distributions q they were drawn from (None when greedy)."""

    tokens: list[int]
    q: torch.Tensor | None  # (γ, V) or None (greedy, or a deterministic proposal)
    source: str = "draft"  # draft | branch | a retrieval source's name


@dataclass
class Rollout:
    branch: Branch
    draft: Draft  # the γ tokens after the branch token
    rows: list[int]  # cache rows holding [c, r_1, .., r_{γ-1}]


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
        if logits.shape != (n, self.runner.vocab_size) or not torch.isfinite(logits).all():
            raise DeviceError(
                f"{self.runner.name} returned malformed logits {tuple(logits.shape)} "
                f"(expected ({n}, {self.runner.vocab_size}), finite)"
            )
        return logits

    def _pick(self, logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """(R, V) logits -> one token per row (+ the (R, V) distributions when sampling)."""
        if self.sampling.greedy:
            return logits.argmax(-1).tolist(), None
        q = probs(logits, self.sampling)
        return [sample(q[r], self.gen) for r in range(q.shape[0])], q

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Append tokens causally after the valid rows; returns their logits (T, V)."""
        start, t = self.runner.length, len(tokens)
        ids = torch.tensor([tokens])
        pos = torch.arange(start, start + t).unsqueeze(0)
        cols = torch.arange(start + t)
        mask = (cols[None, :] <= torch.arange(start, start + t)[:, None]).unsqueeze(0)
        logits = self._check(self.runner.forward(ids, pos, mask), t)
        self.rows.extend(tokens)
        return logits

    def sync(self, committed: list[int]) -> None:
        """Roll back to the longest prefix of `committed` the cache holds, keeping at least the
        last committed token unfed (its logits are needed to draft)."""
        keep = min(_common_prefix(self.rows, committed), len(committed) - 1)
        self.runner.rollback(keep)
        del self.rows[keep:]

    # --- the three operations -----------------------------------------------------------
    def draft_chain(self, committed: list[int], gamma: int) -> Draft:
        """Vanilla drafting: γ tokens continuing `committed`, one draft forward each."""
        self.sync(committed)
        logits = self._feed(committed[len(self.rows) :])[-1:]
        tokens, qs = [], []
        for step in range(gamma):
            tok, q = self._pick(logits)
            tokens += tok
            qs.append(q)
            if step + 1 < gamma:
                logits = self._feed(tok)
        return Draft(tokens, None if qs[0] is None else torch.cat(qs))

    def rollout(
        self, committed: list[int], block: list[int], branches: list[Branch], gamma: int
    ) -> list[Rollout]:
        """Roll out γ tokens for every branch in one batched, tree-masked forward per step.

        Branch (j, c) sees committed + block[:j] and then its own rows. Missing path rows
        (usually d_γ) are fed first as a causal chain that the depth-j branches share.
        """
        n, path = len(committed), committed + block
        self.sync(path)
        start = len(self.rows)
        chain = path[start:]  # path rows not cached yet
        b = len(branches)
        own: list[list[int]] = [[] for _ in range(b)]
        toks = [br.token for br in branches]
        qs: list[list[torch.Tensor]] = [[] for _ in range(b)]
        outs: list[list[int]] = [[] for _ in range(b)]
        for step in range(gamma):
            rows = (chain if step == 0 else []) + toks
            base = self.runner.length
            t = len(rows)
            mask = torch.zeros(1, t, base + t, dtype=torch.bool)
            pos = torch.empty(1, t, dtype=torch.long)
            for i in range(len(rows) - b):  # chain rows: causal over the path
                mask[0, i, : base + i + 1] = True
                pos[0, i] = start + i
            for k, br in enumerate(branches):
                i = t - b + k
                visible_path = n + br.depth  # rows [0, n + j) hold committed + d_1..d_j
                mask[0, i, : min(visible_path, start)] = True
                if visible_path > start:  # part of the path came in as chain rows this step
                    mask[0, i, start:visible_path] = True
                mask[0, i, own[k]] = True
                mask[0, i, base + i] = True
                pos[0, i] = n + br.depth + step
            logits = self._check(self.runner.forward(torch.tensor([rows]), pos, mask), t)
            if step == 0:
                self.rows.extend(chain)
            picked, q = self._pick(logits[t - b :])
            for k in range(b):
                own[k].append(base + t - b + k)
                outs[k].append(picked[k])
                if q is not None:
                    qs[k].append(q[k : k + 1])
            toks = picked
        return [
            Rollout(br, Draft(outs[k], torch.cat(qs[k]) if qs[k] else None), own[k])
            for k, br in enumerate(branches)
        ]

    def commit_branch(self, committed_len_before: int, accepted: int, rollout: Rollout) -> None:
        """Keep the accepted path and the winning branch's rows (compaction); drop the rest.

        After this the cache holds committed + d_1..d_a + c + r_1..r_{γ-1}: exactly the state
        after drafting the next block r_1..r_γ.
        """
        start = committed_len_before + accepted
        self.runner.keep(start, rollout.rows)
        del self.rows[start:]
        self.rows += [rollout.branch.token] + rollout.draft.tokens[:-1]
