"""`BatchSession`: a continuous batch on one plan, for a server (#15).

    with plan.batch_session(mode="speculative") as b:
        h = b.admit(prompt, max_new_tokens=64, temperature=0.0)   # checked now (ValueError)
        for deltas in b.rounds():             # {handle: new tokens} per round
            ...                               # b.admit(...) / b.cancel(h) between rounds
        b.result(h)                           # GenerationResult once it finished

Sequences join before any round (prefilled into free columns of the packed caches) and leave
at the end of the round where they finish or are cancelled; the others never wait. `rounds()`
ends when no sequence is live and none is waiting; call it again after admitting more. The
session holds the plan's busy lock for its lifetime. Each sequence's tokens equal its batch-1
tokens (docs/runtime.md, *Batches*).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from mirror_sd.runtime.batch import BatchJob
from mirror_sd.runtime.results import GenerationResult, GenerationStats
from mirror_sd.runtime.scheduler import SeqState, VerificationScheduler

ADMIT_KEYS = ("seed", "stop_strings", "eos_token_id", "chat", "temperature", "top_k", "top_p")


class BatchFullError(RuntimeError):
    """The sequence would fit the plan's cache alone but not beside the live ones: wait."""


class BatchSession:
    def __init__(self, plan, trace: str | None = None, **overrides):
        """`overrides`: SpecConfig fields for the whole session (mode, num_draft_tokens, ...);
        per-sequence settings go to `admit`. Raises ValueError as `generate` does."""
        self.plan, self.overrides, self.trace = plan, overrides, trace
        probe = BatchJob.prepare(plan, [[0]], 1, **overrides)  # checks mode and settings once
        self.settings, self.spec, self.max_len = probe.settings, probe.spec, probe.spec.max_len
        self._jobs: dict[int, BatchJob] = {}
        self._seqs: dict[int, SeqState] = {}
        self._pending: list[SeqState] = []
        self._cancelled: set[int] = set()
        self._sent: dict[int, int] = {}
        self._start: dict[int, float] = {}
        self._results: dict[int, GenerationResult] = {}
        self._next = 0
        self._sched: VerificationScheduler | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> BatchSession:
        self.plan.claim()
        self._sched = self.plan.scheduler(self.spec, self.settings)
        return self

    def __exit__(self, *exc) -> None:
        if self._sched is not None:
            self.plan.retire(self._sched, self.trace, [], self.spec)
        self.plan.release()

    # --- sequences ------------------------------------------------------------------------
    def admit(self, prompt, max_new_tokens: int = 128, **kwargs) -> int:
        """Queue one prompt for the next round; returns its handle. `kwargs`: ADMIT_KEYS.

        Raises:
            ValueError: the prompt or a setting is invalid (as `generate` says), or a keyword
                that only the session sets; PromptTooLongError: it can never fit;
            BatchFullError: it does not fit beside the sequences already admitted (retry after
                some finish).
        """
        unknown = sorted(set(kwargs) - set(ADMIT_KEYS))
        if unknown:
            raise ValueError(
                f"admit: {unknown} are set for the whole session (plan.batch_session(...)); "
                f"per sequence: {', '.join(ADMIT_KEYS)}"
            )
        job = BatchJob.prepare(self.plan, [prompt], max_new_tokens, **kwargs, **self.overrides)
        need = len(job.ids[0]) + job.max_new_tokens[0] + job.slack
        if self._rows_reserved() + need > self.max_len:
            raise BatchFullError(
                f"the batch reserves {self._rows_reserved()} of {self.max_len} rows; this "
                f"sequence needs {need}: admit it after some sequences finish"
            )
        h, self._next = self._next, self._next + 1
        seq = self.plan.sequence(h, job.ids[0], job.max_new_tokens[0], job.samplings[0],
                                 job.seeds[0], job.spec)  # fmt: skip
        self._jobs[h], self._seqs[h], self._sent[h] = job, seq, 0
        self._start[h] = time.perf_counter()
        self._pending.append(seq)
        return h

    def cancel(self, handle: int) -> None:
        """Stop a sequence: it leaves at the end of the current round (or never joins); its
        result (the tokens so far) is ready from the next round on, or when `rounds` ends."""
        self._cancelled.add(handle)
        waiting = [s for s in self._pending if s.index == handle]
        for seq in waiting:
            self._pending.remove(seq)
            self._finish(seq)

    def rounds(self) -> Iterator[dict[int, list[int]]]:
        """Run rounds while any sequence is live or waiting; yield {handle: new tokens} (cut at
        EOS / stop strings; finished sequences' results are ready once they appear)."""
        if self._sched is None:
            raise RuntimeError("use the session in a with-block: with plan.batch_session() as b")
        for new in self._sched.run([], self._done, admit=self._drain):
            self._collect_left()
            out = {}
            for h in new:
                seq = self._seqs[h]
                cut = self._jobs[h].cut(0, seq.produced)
                out[h], self._sent[h] = cut[self._sent[h] :], len(cut)
                if (
                    seq.finished_at is not None
                    or self._done(seq)
                    or (len(seq.produced) >= seq.max_new_tokens)
                ):
                    self._finish(seq)
            yield out
        self._collect_left()

    def result(self, handle: int) -> GenerationResult:
        """The finished sequence's result (KeyError while it runs)."""
        return self._results[handle]

    @property
    def live(self) -> int:
        """Sequences admitted and not finished."""
        return len(self._seqs) - len(self._results)

    @property
    def rows_in_use(self) -> int:
        """Target cache columns held by sequences that have not finished."""
        cols = self._sched.target.cols if self._sched is not None else {}
        return sum(len(c) for h, c in list(cols.items()) if h not in self._results)

    # --- internals ------------------------------------------------------------------------
    def _rows_reserved(self) -> int:
        return sum(
            len(self._jobs[h].ids[0]) + self._jobs[h].max_new_tokens[0] + self._jobs[h].slack
            for h in self._seqs
            if h not in self._results and h not in self._cancelled  # cancelled: gone next round
        )

    def _collect_left(self) -> None:
        """Results for sequences that left the batch (a cancelled one leaves unseen)."""
        for seq in self._seqs.values():
            if seq.finished_at is not None:
                self._finish(seq)

    def _drain(self) -> list[SeqState]:
        pending, self._pending = self._pending, []
        return pending

    def _done(self, seq: SeqState) -> bool:
        job = self._jobs[seq.index]
        if seq.index in self._cancelled or job.eos & set(seq.produced):
            return True
        stops, decode = job.stop_strings[0], self.plan.tokenizer.decode
        return bool(stops) and any(
            s in decode(seq.produced, skip_special_tokens=True) for s in stops
        )

    def _finish(self, seq: SeqState) -> None:
        h = seq.index
        if h in self._results:
            return
        job = self._jobs[h]
        tokens = job.cut(0, seq.produced)
        wall = time.perf_counter() - self._start[h]
        draft = self._sched.draft if self._sched is not None else None
        stats = GenerationStats.from_rounds(
            self.settings.mode, seq.rounds, len(tokens), wall,
            self.plan.draft_device.label if draft is not None else None,
            seq.fault, seq.reused,
        )  # fmt: skip
        text = self.plan.tokenizer.decode(tokens, skip_special_tokens=True)
        self._results[h] = GenerationResult(tokens, text, len(job.ids[0]), stats, seq.rounds)
        if h not in self._cancelled:
            self.plan.learn(job.ids[0], tokens, self.spec)
