"""`BatchScheduler`: the round loop for many sequences, one target forward per round.

The batch form of `VerificationScheduler` for `speculative` and `autoregressive` (γ = 0):

    DRAFT     draft pipeline: every live sequence drafts ≤ γ tokens, one packed draft
              forward per step (`BatchDraft`)
    VERIFY    target pipeline: the blocks [x_n, d_1..d_γ] of all live sequences packed into
              one forward (`PackedCache`); each sequence gets its own verdict
    COMMIT    per sequence: the target keeps x_n, d_1..d_a; rejected rows become holes
    LEAVE     sequences that hit EOS, a stop string or their budget leave the batch: their
              columns become holes on both devices, reused after the next compaction

Every sequence has its own budget, sampling settings and verification generator, so with
sampling each draws as batch 1 does with its seed. Single-threaded and deterministic like the
batch-1 scheduler; a draft failure drops the whole batch to target-only decoding with the
same tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch

from mirror_sd.devices.base import SplitRunner, set_threads
from mirror_sd.runtime.acceptance import Sampling, probs, verify_greedy, verify_sampling
from mirror_sd.runtime.batch_draft import BatchDraft
from mirror_sd.runtime.draft_engine import Draft
from mirror_sd.runtime.packing import PackedCache
from mirror_sd.runtime.pipelines import Pipeline
from mirror_sd.runtime.scheduler import RoundLog, RoundSettings
from mirror_sd.runtime.tracing import Tracer


@dataclass
class SeqState:
    """One sequence of a batch: its committed tokens and what it has produced so far."""

    index: int  # its place in the caller's list of prompts
    committed: list[int]  # prompt + new tokens
    max_new_tokens: int
    sampling: Sampling  # its own logits processing (greedy when temperature is 0)
    verify_gen: torch.Generator
    draft_gen: torch.Generator  # draws its draft tokens when sampling
    produced: list[int] = field(default_factory=list)
    rounds: list[RoundLog] = field(default_factory=list)
    finished_at: float | None = None  # tracer time when it left the batch


class BatchScheduler:
    def __init__(
        self,
        target: SplitRunner,
        target_pipe: Pipeline,
        draft: BatchDraft | None,
        draft_pipe: Pipeline | None,
        settings: RoundSettings,
        tracer: Tracer,
    ):
        if settings.mode == "mirror":
            raise ValueError(
                "mode 'mirror' does not run batches yet: use mode='speculative' for a batch, "
                "or generate the prompts one at a time"
            )
        self.target, self.tp = PackedCache(target), target_pipe
        self.draft, self.dp = draft, draft_pipe
        self.s, self.tracer = settings, tracer
        self.fallback: str | None = None  # why the draft was dropped, if it was
        self.draft_hung = False

    # --- public -------------------------------------------------------------------------
    def run(
        self,
        seqs: list[SeqState],
        done: Callable[[SeqState], bool],
        admit: Callable[[], list[SeqState]] | None = None,
    ) -> Iterator[dict[int, list[int]]]:
        """Yield {sequence index: tokens committed} per round until every sequence is done
        (`done(seq)` after a round, or its budget); finished sequences leave the batch.

        `admit`, when given, is asked before every round for sequences that join now (their
        prompts are prefilled into free columns; indices must be new): continuous batching.
        The loop ends when no sequence is live after asking.
        """
        pending = list(seqs)
        live: list[SeqState] = []
        while True:
            pending += admit() if admit is not None else []
            for seq in pending:
                self._join(seq)
                live.append(seq)
            pending = []
            if not live:
                return
            new = self._round(live)
            for seq in live:
                tokens = new[seq.index][: seq.max_new_tokens - len(seq.produced)]
                seq.committed += tokens
                seq.produced += tokens
                new[seq.index] = tokens
            yield new
            for seq in [s for s in live if len(s.produced) >= s.max_new_tokens or done(s)]:
                self._leave(seq)
                live.remove(seq)

    # --- phases -------------------------------------------------------------------------
    def _threads(self) -> None:
        """Every core to the pipeline that runs alone (batches never overlap the two)."""
        b = self.s.threads
        if b is not None:
            set_threads(self.target.runner, b.target(False))
            if self.draft is not None:
                set_threads(self.draft.runner, b.draft(False))

    def _draft_alive(self) -> bool:
        return self.draft is not None and self.fallback is None and self.s.mode != "autoregressive"

    def _fail(self, why: str, hung: bool = False) -> None:
        self.fallback, self.draft_hung = why, hung
        self.tracer.instant(self.dp.device, self.dp.name, "draft failed: target-only fallback",
                            self.tracer.now(), why=why)  # fmt: skip
        warnings.warn(
            f"draft device failed ({why}); continuing target-only, output unchanged", stacklevel=3
        )

    def _drafts(self, live: list[SeqState]) -> dict[int, Draft]:
        """Each live sequence's block (empty when the draft is off or failed)."""
        blocks = {s.index: Draft([], None, source="target") for s in live}
        if not self._draft_alive():
            return blocks
        fut = self.dp.submit(self.tracer, "draft.chain", self.draft.chain,
                             {s.index: s.committed for s in live}, self.s.gamma,
                             self.s.draft_stop)  # fmt: skip
        try:
            return fut.result(timeout=self.s.draft_timeout_s)
        except FutureTimeout:
            self._fail(f"draft step exceeded draft_timeout_s={self.s.draft_timeout_s}", hung=True)
        except Exception as exc:  # any device error: the output must not depend on it
            self._fail(f"{type(exc).__name__}: {exc}")
        return blocks

    def _round(self, live: list[SeqState]) -> dict[int, list[int]]:
        self._threads()
        t0 = self.tracer.now()
        blocks = self._drafts(live)
        t1 = self.tracer.now()
        rows = {s.index: [s.committed[-1], *blocks[s.index].tokens] for s in live}
        logits = self.tp.submit(self.tracer, "target.verify", self.target.forward, rows).result()
        t2 = self.tracer.now()
        new = {}
        for seq in live:
            block = blocks[seq.index]
            d, lg = block.tokens, logits[seq.index]  # lg: (len(d) + 1, V)
            if seq.sampling.greedy:
                v = verify_greedy(d, lg)
            else:
                v = verify_sampling(d, block.q, probs(lg, seq.sampling), seq.verify_gen)
            self.target.truncate(seq.index, len(seq.committed) + v.accepted)  # x_n, d_1..d_a
            new[seq.index] = [*d[: v.accepted], v.correction]
            seq.rounds.append(RoundLog(
                v.accepted, v.accepted + 1, None, t_suf=t2 - t1, t_draft=t1 - t0,
                exposed=t1 - t0, source=block.source, drafted=len(d),
            ))  # fmt: skip
        self.tracer.counter("batch", t2, live=len(live))
        return new

    def _join(self, seq: SeqState) -> None:
        """A sequence joins: its prompt (but the last token) is prefilled on the target; the
        draft feeds it at its first drafting step."""
        self._threads()
        self.target.add(seq.index)
        self.tp.submit(self.tracer, "target.prefill", self.target.fill, seq.index,
                       seq.committed[:-1]).result()  # fmt: skip
        if self.draft is not None and not self.draft_hung:
            self.draft.add(seq.index, seq.sampling, seq.draft_gen)

    def _leave(self, seq: SeqState) -> None:
        """The sequence is done: its rows on both devices become holes."""
        seq.finished_at = self.tracer.now()
        self.target.drop(seq.index)
        if self.draft is not None and not self.draft_hung and seq.index in self.draft.gens:
            self.draft.drop(seq.index)
