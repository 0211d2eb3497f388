"""Batched generation: `plan.generate([p1, p2, ...])` -> one `GenerationResult` per prompt.

`BatchJob.prepare` checks everything before any work starts (each prompt, the budget, that the
mode runs batches and that the whole batch fits in the plan's caches); `run` drives the
`BatchScheduler` and returns the results in the prompts' order. Every sequence's greedy
output equals its batch-1 output; see docs/runtime.md, *Batches*.

Stage 1 limits (each raises ValueError naming the fix): modes `speculative` and
`autoregressive` only; one set of sampling settings, stop strings and EOS ids for the whole
batch; no retrieval draft sources; no streaming form.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mirror_sd.partition.spec_config import SpecConfig
from mirror_sd.runtime.acceptance import Sampling
from mirror_sd.runtime.batch_draft import BatchDraft
from mirror_sd.runtime.batch_scheduler import BatchScheduler, SeqState
from mirror_sd.runtime.prompts import (
    Prompt,
    PromptTooLongError,
    check_fits,
    check_max_new_tokens,
    encode_prompt,
)
from mirror_sd.runtime.results import BatchStats, GenerationResult, GenerationStats
from mirror_sd.runtime.scheduler import RoundSettings
from mirror_sd.runtime.stops import truncate
from mirror_sd.runtime.tracing import Tracer


def is_batch(prompt: object) -> bool:
    """True for a list of prompts: a non-empty list or tuple whose items are all strings or
    lists (a list of ints is one prompt of token ids; a list of dicts is one conversation)."""
    return (
        isinstance(prompt, list | tuple)
        and len(prompt) > 0
        and all(isinstance(p, str | list | tuple) for p in prompt)
    )


@dataclass
class BatchJob:
    """A checked batch, ready to run on its plan."""

    plan: object  # runtime.plan.Plan (not imported: plan imports this module)
    ids: list[list[int]]
    max_new_tokens: int
    spec: SpecConfig
    settings: RoundSettings
    seeds: list[int]
    stop_strings: Sequence[str]
    eos: set[int]
    trace: str | None

    @classmethod
    def prepare(
        cls,
        plan,
        prompts: Sequence[Prompt],
        max_new_tokens: int,
        *,
        seed: int | Sequence[int] = 0,
        stop_strings: Sequence[str] = (),
        eos_token_id: int | Sequence[int] | None = None,
        chat: bool = True,
        trace: str | None = None,
        **overrides,
    ) -> BatchJob:
        """Check a batch; the keyword arguments are `Plan.stream`'s. `seed` is an int (prompt i
        gets seed + i: the generators batch 1 uses with that seed) or one int per prompt.

        Raises:
            ValueError: naming the argument, or `prompts[i]` and why, before any work starts;
                PromptTooLongError when a prompt or the whole batch does not fit in max_len.
        """
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        if overrides.get("mode") == "auto":
            overrides["mode"] = plan.spec.mode
        spec = plan.spec.with_(**overrides)
        settings = plan._settings(spec)
        if settings.mode == "mirror":
            raise ValueError(
                "mode 'mirror' does not run batches yet: pass mode='speculative' (or "
                "'autoregressive') for a batch, or generate the prompts one at a time"
            )
        if spec.retrieval != "none":
            raise ValueError(
                f"retrieval {spec.retrieval!r} does not run in batches yet: pass "
                "retrieval='none' for a batch, or generate the prompts one at a time"
            )
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompts) or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"seed: an int or one int per prompt ({len(prompts)}), got {seed!r}")
        vocab = getattr(plan.target, "vocab_size", None)
        ids, slack = [], settings.gamma + 1 if settings.mode == "speculative" else 1
        for i, prompt in enumerate(prompts):
            try:
                ids.append(encode_prompt(plan.tokenizer, prompt, chat=chat, vocab_size=vocab))
                check_fits(len(ids[-1]), max_new_tokens, spec.max_len, slack=slack)
            except ValueError as e:
                raise type(e)(f"prompts[{i}]: {e}") from None
        need = sum(len(x) + max_new_tokens + slack for x in ids)
        if need > spec.max_len:
            raise PromptTooLongError(
                f"the batch of {len(ids)} prompts ({sum(map(len, ids))} tokens) + "
                f"max_new_tokens {max_new_tokens} each + {slack} rows each = {need} exceeds "
                f"the context of {spec.max_len} tokens, which one batch shares: raise max_len, "
                "lower max_new_tokens, or split the batch"
            )
        return cls(plan, ids, max_new_tokens, spec, settings, seeds, stop_strings,
                   plan._eos(eos_token_id), trace)  # fmt: skip

    def run(self) -> list[GenerationResult]:
        """Generate every sequence (the caller holds the plan's busy lock)."""
        plan, spec, settings = self.plan, self.spec, self.settings
        sampling = Sampling(spec.temperature, spec.top_k, spec.top_p)
        tracer = Tracer()
        tracer.add_device(plan.target_device.alias, plan.target_device.label)
        draft = None
        use_draft = plan.draft is not None and spec.model_draft and plan.draft_disabled is None
        if use_draft and settings.mode != "autoregressive":
            tracer.add_device(plan.draft_device.alias, plan.draft_device.label)
            draft = BatchDraft(plan.draft, sampling)
        seqs = []
        for i, (ids, seed) in enumerate(zip(self.ids, self.seeds, strict=True)):
            seqs.append(SeqState(i, list(ids), torch.Generator().manual_seed(seed)))
            if draft is not None:
                draft.add(i, torch.Generator().manual_seed(seed + 1))
        sched = BatchScheduler(plan.target, plan.target_pipe, draft, plan.draft_pipe, settings,
                               sampling, tracer)  # fmt: skip
        t0, start = time.perf_counter(), tracer.now()
        rounds = 0
        try:
            for _ in sched.run(seqs, self.max_new_tokens, self._done):
                rounds += 1
        finally:
            wall = time.perf_counter() - t0
            if sched.draft_hung:
                plan.draft_disabled = sched.fallback
            path = str(tracer.save(self.trace)) if self.trace else None
        caches = [sched.target] + ([draft.cache] if draft is not None else [])
        produced = [self._cut(s.produced) for s in seqs]
        batch = BatchStats(
            size=len(seqs), new_tokens=sum(map(len, produced)), wall_s=wall,
            tokens_per_s=sum(map(len, produced)) / wall if wall > 0 else 0.0, rounds=rounds,
            compactions=sum(c.compactions for c in caches),
            moved_rows=sum(c.moved_rows for c in caches),
            realign_s=sum(c.compact_s for c in caches),
        )  # fmt: skip
        results = []
        for seq, tokens in zip(seqs, produced, strict=True):
            latency = (seq.finished_at - start) if seq.finished_at is not None else wall
            stats = GenerationStats.from_rounds(
                settings.mode, seq.rounds, len(tokens), latency,
                plan.draft_device.label if draft else None, sched.fallback,
            )  # fmt: skip
            text = plan.tokenizer.decode(tokens, skip_special_tokens=True)
            results.append(GenerationResult(tokens, text, len(self.ids[seq.index]), stats,
                                            seq.rounds, path, batch))  # fmt: skip
        return results

    def _cut(self, produced: list[int]) -> list[int]:
        return truncate(produced, self.eos, self.stop_strings, self.plan.tokenizer)

    def _done(self, seq: SeqState) -> bool:
        if self.eos & set(seq.produced):
            return True
        decode = self.plan.tokenizer.decode
        return bool(self.stop_strings) and any(
            s in decode(seq.produced, skip_special_tokens=True) for s in self.stop_strings
        )
