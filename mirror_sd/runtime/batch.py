"""Batched generation: `plan.generate([p1, p2, ...])` -> one `GenerationResult` per prompt.

`BatchJob.prepare` checks everything before any work starts (each prompt, the budgets, the
settings, and that the whole batch fits in the plan's caches); `run` drives the
`BatchScheduler` and returns the results in the prompts' order. Every sequence's greedy
output equals its batch-1 output; see docs/runtime.md, *Batches*.

Per prompt: `max_new_tokens`, `temperature`, `top_k`, `top_p`, `stop_strings` and `seed` take
either one value for the whole batch or a list with one value per prompt (`stop_strings`: a
list of lists). Modes `mirror`, `speculative` and `autoregressive`. Limits (each raises
ValueError naming the fix): no retrieval draft sources; no streaming form (a server uses
`plan.batch_session()`).
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
    max_new_tokens: list[int]  # per prompt, as every list below
    samplings: list[Sampling]
    seeds: list[int]
    stop_strings: list[Sequence[str]]
    spec: SpecConfig
    settings: RoundSettings
    eos: set[int]
    trace: str | None

    @classmethod
    def prepare(
        cls,
        plan,
        prompts: Sequence[Prompt],
        max_new_tokens: int | Sequence[int],
        *,
        seed: int | Sequence[int] = 0,
        stop_strings: Sequence[str] | Sequence[Sequence[str]] = (),
        eos_token_id: int | Sequence[int] | None = None,
        chat: bool = True,
        trace: str | None = None,
        **overrides,
    ) -> BatchJob:
        """Check a batch; the keyword arguments are `Plan.stream`'s, and those named in the
        module doc may give one value per prompt. An int `seed` gives prompt i seed + i (the
        generators batch 1 uses with that seed).

        Raises:
            ValueError: naming the argument, or `prompts[i]` and why, before any work starts;
                PromptTooLongError when a prompt or the whole batch does not fit in max_len.
        """
        n = len(prompts)
        news = [check_max_new_tokens(m) for m in _per_prompt("max_new_tokens", max_new_tokens, n)]
        seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
        if len(seeds) != n or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"seed: an int or one int per prompt ({n}), got {seed!r}")
        per_seq = {k: _per_prompt(k, overrides.pop(k), n)
                   for k in SAMPLING_FIELDS if isinstance(overrides.get(k), list | tuple)}  # fmt: skip
        stops = (
            [list(x) for x in stop_strings]
            if stop_strings and all(isinstance(x, list | tuple) for x in stop_strings)
            else [list(stop_strings)] * n
        )
        if len(stops) != n:
            raise ValueError(f"stop_strings: a list of str, or one list per prompt ({n})")
        if overrides.get("mode") == "auto":
            overrides["mode"] = plan.spec.mode
        spec = plan.spec.with_(**overrides)
        samplings = []
        for i in range(n):  # SpecConfig checks each prompt's values
            one = spec.with_(**{k: v[i] for k, v in per_seq.items()})
            samplings.append(Sampling(one.temperature, one.top_k, one.top_p))
        settings = plan._settings(spec)
        if spec.retrieval != "none":
            raise ValueError(
                f"retrieval {spec.retrieval!r} does not run in batches yet: pass "
                "retrieval='none' for a batch, or generate the prompts one at a time"
            )
        vocab = getattr(plan.target, "vocab_size", None)
        ids, slack = [], _slack(settings)
        for i, prompt in enumerate(prompts):
            try:
                ids.append(encode_prompt(plan.tokenizer, prompt, chat=chat, vocab_size=vocab))
                check_fits(len(ids[-1]), news[i], spec.max_len, slack=slack)
            except ValueError as e:
                raise type(e)(f"prompts[{i}]: {e}") from None
        need = sum(len(x) + m + slack for x, m in zip(ids, news, strict=True))
        if need > spec.max_len:
            raise PromptTooLongError(
                f"the batch of {n} prompts ({sum(map(len, ids))} tokens) + their max_new_tokens "
                f"({sum(news)}) + {slack} rows each = {need} exceeds the context of "
                f"{spec.max_len} tokens, which one batch shares: raise max_len, lower "
                "max_new_tokens, or split the batch"
            )
        return cls(plan, ids, news, samplings, seeds, stops, spec, settings,
                   plan._eos(eos_token_id), trace)  # fmt: skip

    @property
    def slack(self) -> int:
        """Rows each sequence may hold beyond its prompt and new tokens."""
        return _slack(self.settings)

    def run(self) -> list[GenerationResult]:
        """Generate every sequence (the caller holds the plan's busy lock)."""
        plan, spec, settings = self.plan, self.spec, self.settings
        tracer, drafts = plan.tracer_for(spec, settings)
        draft = BatchDraft(plan.draft) if drafts else None
        seqs = []
        for i, (ids, seed) in enumerate(zip(self.ids, self.seeds, strict=True)):
            gens = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
            seqs.append(SeqState(i, list(ids), self.max_new_tokens[i], self.samplings[i], *gens))
        if spec.exit_layer != "auto" and hasattr(plan.target, "exit_layer"):
            plan.target.exit_layer = int(spec.exit_layer)
        exit_head = plan.exit_head.exit_logits if plan.exit_head is not None else None
        sched = BatchScheduler(plan.target, plan.target_pipe, draft, plan.draft_pipe, settings,
                               tracer, exit_head)  # fmt: skip
        t0, start = time.perf_counter(), tracer.now()
        rounds = 0
        try:
            for _ in sched.run(seqs, self._done):
                rounds += 1
        finally:
            wall = time.perf_counter() - t0
            if sched.draft_hung:
                plan.draft_disabled = sched.fallback
            path = str(tracer.save(self.trace)) if self.trace else None
        caches = [sched.target] + ([draft.cache] if draft is not None else [])
        produced = [self._cut(s) for s in seqs]
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

    def _cut(self, seq: SeqState) -> list[int]:
        stops = self.stop_strings[seq.index]
        return truncate(seq.produced, self.eos, stops, self.plan.tokenizer)

    def _done(self, seq: SeqState) -> bool:
        if self.eos & set(seq.produced):
            return True
        stops, decode = self.stop_strings[seq.index], self.plan.tokenizer.decode
        return bool(stops) and any(
            s in decode(seq.produced, skip_special_tokens=True) for s in stops
        )


def _slack(settings: RoundSettings) -> int:
    """Rows a sequence may hold beyond prompt + new tokens: a block, and in mirror mode its
    branch rows (batch 1's figure)."""
    if settings.mode == "mirror":
        return (1 + settings.budget) * (settings.gamma + 1) + 1
    return settings.gamma + 1 if settings.mode == "speculative" else 1


SAMPLING_FIELDS = ("temperature", "top_k", "top_p")  # SpecConfig fields a prompt may set


def _per_prompt(name: str, value: object, n: int) -> list:
    """`value` for each of n prompts: a list of n values as given, anything else repeated."""
    if not isinstance(value, list | tuple):
        return [value] * n
    if len(value) != n:
        raise ValueError(
            f"{name}: one value for the batch or one per prompt ({n}), got {len(value)}"
        )
    return list(value)
