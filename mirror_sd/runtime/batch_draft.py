"""`BatchDraft`: chain drafting for every live sequence of a batch, one draft forward per step.

The batch form of `DraftEngine.draft_chain`: the draft cache is a `PackedCache`, so each step
feeds one token per still-drafting sequence in a single forward. Each sequence has its own
sampling settings, random generator and draft-length decision (`DraftPolicy`), so its
proposals are drawn as batch 1 draws them. Runs on the draft pipeline's worker thread.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch

from mirror_sd.devices.base import DeviceError, ModelRunner
from mirror_sd.runtime.acceptance import Sampling, probs, sample
from mirror_sd.runtime.draft_engine import Draft, _common_prefix
from mirror_sd.runtime.draft_policy import NEVER_STOP, DraftPolicy
from mirror_sd.runtime.packing import PackedCache


class BatchDraft:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.cache = PackedCache(runner)
        self.gens: dict[Hashable, torch.Generator] = {}
        self.samplings: dict[Hashable, Sampling] = {}

    def add(self, sid: Hashable, sampling: Sampling, gen: torch.Generator) -> None:
        """A sequence joins; its tokens are picked under `sampling`, drawn with `gen`."""
        self.cache.add(sid)
        self.samplings[sid], self.gens[sid] = sampling, gen

    def drop(self, sid: Hashable) -> None:
        """A sequence left: its draft rows become holes."""
        self.cache.drop(sid)
        del self.gens[sid], self.samplings[sid]

    def _check(self, logits: torch.Tensor) -> torch.Tensor:
        """Malformed logits (shape, NaN, +inf, no finite value) are a device failure."""
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

    def chain(
        self, committed: Mapping[Hashable, list[int]], gamma: int, policy: DraftPolicy = NEVER_STOP
    ) -> dict[Hashable, Draft]:
        """Up to γ draft tokens continuing each sequence's committed tokens.

        Each sequence first syncs (keeps the longest cached prefix of its committed tokens,
        leaving the last one unfed); tokens missing before the last are filled one sequence at
        a time (a prompt), then every step is one packed forward over the sequences still
        drafting. A sequence whose policy stops keeps the token that triggered the stop
        unfed, as in batch 1.
        """
        feed: dict[Hashable, list[int]] = {}
        for sid, seq in committed.items():
            held = self.cache.tokens[sid]
            self.cache.truncate(sid, min(_common_prefix(held, seq), len(seq) - 1))
            missing = seq[len(self.cache.tokens[sid]) :]
            self.cache.fill(sid, missing[:-1])
            feed[sid] = missing[-1:]
        tokens: dict[Hashable, list[int]] = {sid: [] for sid in committed}
        qs: dict[Hashable, list[torch.Tensor]] = {sid: [] for sid in committed}
        active = list(committed)
        for step in range(gamma):
            logits = self.cache.forward({sid: feed[sid] for sid in active})
            still = []
            for sid in active:
                last = self._check(logits[sid])[-1:]  # (1, V)
                sampling = self.samplings[sid]
                if sampling.greedy:
                    tok, q = int(last.argmax()), None
                else:
                    q = probs(last, sampling)
                    tok = sample(q[0], self.gens[sid])
                    qs[sid].append(q)
                tokens[sid].append(tok)
                stop = policy.active and bool(
                    (policy.stops_logits(last) if q is None else policy.stops(q))[0]
                )
                if step + 1 < gamma and not stop:
                    feed[sid] = [tok]
                    still.append(sid)
            active = still
            if not active:
                break
        return {sid: Draft(tokens[sid], torch.cat(qs[sid]) if qs[sid] else None)
                for sid in committed}  # fmt: skip
