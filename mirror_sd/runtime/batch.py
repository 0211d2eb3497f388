"""Batched generation: `plan.generate([p1, p2, ...])` -> one `GenerationResult` per prompt.

`BatchJob.prepare` checks everything before any work starts (each prompt, the budgets, the
settings, and that the whole batch fits in the plan's caches); `rounds` drives the
`VerificationScheduler` (a single prompt is a job of one: `plan.stream` runs it too) and
`run` returns the results in the prompts' order. Every sequence's greedy output equals its
batch-1 output; see docs/runtime.md, *Batches*.

Per prompt: `max_new_tokens`, `temperature`, `top_k`, `top_p`, `stop_strings` and `seed` take
either one value for the whole batch or a list with one value per prompt (`stop_strings`: a
list of lists). Modes `mirror`, `speculative` and `autoregressive`, with any retrieval source
(each sequence gets its own fork of the plan's source). Streaming one prompt: `plan.stream`;
a server uses `plan.batch_session()`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from mirror_sd.partition.spec_config import SpecConfig
from mirror_sd.runtime.acceptance import Sampling
from mirror_sd.runtime.prompts import (
    Prompt,
    PromptTooLongError,
    check_fits,
    check_max_new_tokens,
    encode_prompt,
)
from mirror_sd.runtime.results import BatchStats, GenerationResult, GenerationStats
from mirror_sd.runtime.scheduler import RoundSettings, SeqState
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
    single: bool = False  # one prompt of `plan.stream` / `plan.generate(prompt)`: no BatchStats
    results: list[GenerationResult] | None = None  # set when `rounds` ends

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
        single: bool = False,
        **overrides,
    ) -> BatchJob:
        """Check a batch; the keyword arguments are `Plan.stream`'s, and those named in the
        module doc may give one value per prompt. An int `seed` gives prompt i seed + i (the
        generators batch 1 uses with that seed). `single`: one prompt of `plan.stream`
        (errors name the prompt, not `prompts[0]`).

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
        base = plan.spec
        if overrides.get("mode") not in (None, "auto") and getattr(plan.report, "auto_alone", ""):
            # mode auto ran a retrieval source alone as the plan's own mode; a call naming a
            # mode runs the map's draft (CompileReport.auto_alone)
            base = base.with_(retrieval="none", model_draft=True)
        if overrides.get("mode") == "auto":
            overrides["mode"] = plan.spec.mode
        if overrides.get("draft_exit_threshold") == "auto":  # the plan's own, as compiled
            overrides["draft_exit_threshold"] = plan.spec.draft_exit_threshold
        spec_t = overrides.get("draft_exit_threshold", plan.spec.draft_exit_threshold)
        if spec_t == "auto" and plan.draft is not None and hasattr(plan.draft, "exits"):
            raise ValueError(
                "draft_exit_threshold 'auto' is measured by compile(); this plan's draft "
                "exits were not: pass a probability in [0, 1]"
            )
        spec = base.with_(**overrides)
        samplings = []
        for i in range(n):  # SpecConfig checks each prompt's values
            one = spec.with_(**{k: v[i] for k, v in per_seq.items()})
            samplings.append(Sampling(one.temperature, one.top_k, one.top_p))
        settings = plan.settings(spec)
        vocab = getattr(plan.target, "vocab_size", None)
        ids, slack = [], _slack(settings)
        for i, prompt in enumerate(prompts):
            try:
                ids.append(encode_prompt(plan.tokenizer, prompt, chat=chat, vocab_size=vocab))
                check_fits(len(ids[-1]), news[i], spec.max_len, slack=slack)
            except ValueError as e:
                if single:
                    raise
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
                   plan.eos_ids(eos_token_id), trace, single)  # fmt: skip

    @property
    def slack(self) -> int:
        """Rows each sequence may hold beyond its prompt and new tokens."""
        return _slack(self.settings)

    def run(self) -> list[GenerationResult]:
        """Generate every sequence (the caller holds the plan's busy lock)."""
        for _ in self.rounds():
            pass
        return self.results

    def rounds(self):
        """Run the job, yielding {prompt index: tokens committed} per round (before the cut
        at EOS / stop strings); `results` is set when it ends, also when closed early."""
        plan = self.plan
        sched = plan.scheduler(self.spec, self.settings)
        seqs = [plan.sequence(i, ids, self.max_new_tokens[i], self.samplings[i], seed, self.spec)
                for i, (ids, seed) in enumerate(zip(self.ids, self.seeds, strict=True))]  # fmt: skip
        exits = getattr(plan.draft, "exits", None) if sched.draft is not None else None
        before = Counter(exits) if exits is not None else None  # S2D: this call's steps
        t0, start = time.perf_counter(), sched.tracer.now()
        rounds = 0
        try:
            for new in sched.run(seqs, self._done):
                rounds += 1
                yield new
        finally:
            wall = time.perf_counter() - t0
            produced = [self._cut(s) for s in seqs]
            path = plan.retire(sched, self.trace, list(zip(self.ids, produced, strict=True)),
                               self.spec)  # fmt: skip
            taken = dict(sorted((exits - before).items())) if exits is not None else None
            self.results = self._results(sched, seqs, produced, wall, start, rounds, path, taken)

    def _results(self, sched, seqs, produced, wall, start, rounds, path, exits=None):
        caches = [sched.target] + ([sched.draft.cache] if sched.draft is not None else [])
        batch = None
        if not self.single:
            batch = BatchStats(
                size=len(seqs), new_tokens=sum(map(len, produced)), wall_s=wall,
                tokens_per_s=sum(map(len, produced)) / wall if wall > 0 else 0.0,
                rounds=rounds, compactions=sum(c.compactions for c in caches),
                moved_rows=sum(c.moved_rows for c in caches),
                realign_s=sum(c.compact_s for c in caches),
            )  # fmt: skip
        results = []
        for seq, tokens in zip(seqs, produced, strict=True):
            left = batch is not None and seq.finished_at is not None  # left a running batch
            latency = seq.finished_at - start if left else wall
            stats = GenerationStats.from_rounds(
                self.settings.mode, seq.rounds, len(tokens), latency,
                self.plan.draft_device.label if sched.draft is not None else None,
                seq.fault, seq.reused, exits,
            )  # fmt: skip
            text = self.plan.tokenizer.decode(tokens, skip_special_tokens=True)
            results.append(GenerationResult(tokens, text, len(self.ids[seq.index]), stats,
                                            seq.rounds, path, batch))  # fmt: skip
        return results

    def cut(self, index: int, produced: list[int]) -> list[int]:
        """Prompt `index`'s tokens cut after its first EOS or stop string."""
        return truncate(produced, self.eos, self.stop_strings[index], self.plan.tokenizer)

    def _cut(self, seq: SeqState) -> list[int]:
        return self.cut(seq.index, seq.produced)

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
