"""`BatchScheduler`: the round loop for many sequences, one target forward per round.

The batch form of `VerificationScheduler`, in all three modes (`autoregressive`: γ = 0):

    DRAFT     draft pipeline: every live sequence without a block drafts ≤ γ tokens, one
              packed draft forward per step (`BatchDraft`)
    VERIFY    target pipeline: the blocks [x_n, d_1..d_γ] of all live sequences packed into
              one forward (`PackedCache`); each sequence gets its own verdict.
              mirror: prefix + exit head over all blocks, then the suffix || every
              sequence's branch rollouts (one tree-masked draft forward per step), and per
              sequence the rendezvous: a hit's rollout is its next block
    COMMIT    per sequence: the target keeps x_n, d_1..d_a; rejected rows become holes
    LEAVE     sequences that hit EOS, a stop string or their budget leave the batch: their
              columns become holes on both devices, reused after the next compaction

Every sequence has its own budget, sampling settings and verification generator, so with
sampling each draws as batch 1 does with its seed. Single-threaded and deterministic like the
batch-1 scheduler; a draft failure drops the whole batch to target-only decoding with the
same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from mirror_sd.devices.base import SplitRunner, set_threads
from mirror_sd.partition.cost_model import DEFAULT_ACCEPT_RATE
from mirror_sd.runtime.acceptance import (
    Sampling,
    Verdict,
    probs,
    verify_greedy,
    verify_sampling,
)
from mirror_sd.runtime.batch_draft import BatchDraft
from mirror_sd.runtime.branches import exit_candidates, plan_branches
from mirror_sd.runtime.draft_engine import Draft
from mirror_sd.runtime.model_draft import DraftFailed, await_draft, drop_draft
from mirror_sd.runtime.packing import PackedCache
from mirror_sd.runtime.pipelines import Pipeline
from mirror_sd.runtime.scheduler import PRIOR_TOKENS, RoundLog, RoundSettings
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
        exit_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.target, self.tp = PackedCache(target), target_pipe
        self.draft, self.dp = draft, draft_pipe
        self.s, self.tracer = settings, tracer
        self.exit_logits = exit_head or target.exit_logits  # hidden (1, T, D) -> (T, V)
        self.fallback: str | None = None  # why the draft was dropped, if it was
        self.draft_hung = False
        self.next_blocks: dict[int, Draft] = {}  # mirror: a hit branch's rollout per sequence
        self._judged = self._taken = 0  # draft tokens verified / accepted (running α)

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
    def _threads(self, overlapped: bool = False) -> None:
        """Every core to the pipeline that runs alone; the budget's overlap counts while mirror
        overlaps the suffix and the rollouts (as batch 1)."""
        b = self.s.threads
        if b is not None:
            set_threads(self.target.runner, b.target(overlapped))
            if self.draft is not None:
                set_threads(self.draft.runner, b.draft(overlapped))

    def _draft_alive(self) -> bool:
        return self.draft is not None and self.fallback is None and self.s.mode != "autoregressive"

    def _fail(self, why: str, hung: bool = False) -> None:
        drop_draft(self, self.tracer, self.dp, why, hung)  # its fallback / draft_hung

    def _drafts(self, live: list[SeqState]) -> dict[int, Draft]:
        """Each live sequence's block: a hit branch's rollout kept from the last round, else
        drafted now (all of those in one chain); empty when the draft is off or failed."""
        blocks = {s.index: self.next_blocks.pop(s.index, None) for s in live}
        need = {s.index: s.committed for s in live if blocks[s.index] is None}
        empty = Draft([], None, source="target")
        if not self._draft_alive():
            return {k: empty for k in blocks}
        if need:
            fut = self.dp.submit(self.tracer, "draft.chain", self.draft.chain, need,
                                 self.s.gamma, self.s.draft_stop)  # fmt: skip
            try:
                blocks.update(self._draft_result(fut))
            except DraftFailed:
                return {k: empty for k in blocks}
        return blocks

    def _draft_result(self, fut):
        return await_draft(fut, self.s.draft_timeout_s, self._fail)

    def _verify(self, seq: SeqState, block: Draft, logits: torch.Tensor) -> Verdict:
        """The sequence's verdict on its block; logits (len(block) + 1, V)."""
        d = block.tokens
        if seq.sampling.greedy:
            v = verify_greedy(d, logits)
        else:
            v = verify_sampling(d, block.q, probs(logits, seq.sampling), seq.verify_gen)
        if d:  # the running α estimate (tokens up to the first rejection)
            self._judged += min(v.accepted + 1, len(d))
            self._taken += v.accepted
        return v

    def _round(self, live: list[SeqState]) -> dict[int, list[int]]:
        self._threads()
        t0 = self.tracer.now()
        blocks = self._drafts(live)
        t_draft = self.tracer.now() - t0
        mirror = self.s.mode == "mirror" and self._draft_alive()
        if mirror and all(b.tokens for b in blocks.values()):
            new = self._mirror_round(live, blocks, t_draft)
        else:
            new = self._plain_round(live, blocks, t_draft)
        self.tracer.counter("batch", self.tracer.now(), live=len(live))
        return new

    def _plain_round(self, live, blocks, t_draft: float) -> dict[int, list[int]]:
        """Speculative (or γ = 0) verification of every block in one target forward."""
        t1 = self.tracer.now()
        rows = {s.index: [s.committed[-1], *blocks[s.index].tokens] for s in live}
        logits = self.tp.submit(self.tracer, "target.verify", self.target.forward, rows).result()
        t2 = self.tracer.now()
        new = {}
        for seq in live:
            block = blocks[seq.index]
            v = self._verify(seq, block, logits[seq.index])
            self.target.truncate(seq.index, len(seq.committed) + v.accepted)  # x_n, d_1..d_a
            new[seq.index] = [*block.tokens[: v.accepted], v.correction]
            seq.rounds.append(RoundLog(
                v.accepted, v.accepted + 1, None, t_suf=t2 - t1, t_draft=t_draft,
                exposed=t_draft, source=block.source, drafted=len(block.tokens),
            ))  # fmt: skip
        return new

    def _mirror_round(self, live, blocks, t_draft: float) -> dict[int, list[int]]:
        """Mirror for the batch: prefix + exit head over all blocks, then the suffix on the
        target while the draft rolls out every sequence's planned branches; per sequence the
        verdict, the rendezvous and, on a hit, the next block."""
        rows = {s.index: [s.committed[-1], *blocks[s.index].tokens] for s in live}
        t0 = self.tracer.now()

        def prefix_and_exit():
            hidden = self.target.forward_prefix(rows)  # (1, T, D)
            exits = self.target.split(rows, self.exit_logits(hidden))  # {seq: (t_s, V)}
            return hidden, {k: exit_candidates(x, self.s.kappa) for k, x in exits.items()}

        hidden, cands = self.tp.submit(self.tracer, "target.prefix+exit_head",
                                       prefix_and_exit).result()  # fmt: skip
        t1 = self.tracer.now()
        alpha = self._accept_rate()
        ranked = {}
        for seq in live:
            ids, p = cands[seq.index]
            ranked[seq.index] = plan_branches(blocks[seq.index].tokens, ids, p, ids.numel(), alpha)
        work = {s.index: (s.committed, blocks[s.index].tokens, ranked[s.index][: self.s.budget])
                for s in live}  # fmt: skip
        self._threads(overlapped=True)
        suffix = self.tp.submit(self.tracer, "target.suffix", self.target.forward_suffix, hidden)
        rollout = self.dp.submit(self.tracer, "draft.rollout", self.draft.rollout, work,
                                 self.s.gamma, self.s.draft_stop)  # fmt: skip
        logits = suffix.result()
        t2 = self.tracer.now()
        verdicts, new = {}, {}
        for seq in live:
            block = blocks[seq.index]
            v = verdicts[seq.index] = self._verify(seq, block, logits[seq.index])
            self.target.truncate(seq.index, len(seq.committed) + v.accepted)
            new[seq.index] = [*block.tokens[: v.accepted], v.correction]
            rank = next((i for i, b in enumerate(ranked[seq.index])
                         if (b.depth, b.token) == (v.accepted, v.correction)), None)  # fmt: skip
            seq.rounds.append(RoundLog(
                v.accepted, v.accepted + 1, False, t_pre=t1 - t0, t_suf=t2 - t1,
                t_draft=t_draft, exposed=t_draft, branches=len(work[seq.index][2]),
                source=block.source, drafted=len(block.tokens), hit_rank=rank,
            ))  # fmt: skip
        try:
            rollouts = self._draft_result(rollout)
        except DraftFailed:
            return new
        r_start, r_end = rollout.span
        for seq in live:
            log, v = seq.rounds[-1], verdicts[seq.index]
            log.t_draft += r_end - r_start
            log.exposed += max(0.0, r_end - suffix.span[1])
            mine = rollouts[seq.index]
            log.rollout_steps = max((len(r.draft.tokens) for r in mine), default=0)
            hit = (
                mine[log.hit_rank]
                if log.hit_rank is not None and log.hit_rank < len(mine)
                else None
            )
            log.hit = hit is not None
            if hit is not None and self.s.reuse:
                self.draft.commit_branch(seq.index, len(seq.committed), v.accepted, hit)
                self.next_blocks[seq.index] = Draft(hit.draft.tokens, hit.draft.q, source="branch")
        self.draft.end_rollouts()
        return new

    def _accept_rate(self) -> float:
        """The running α of this batch's draft tokens with the plan's prior (as batch 1)."""
        prior = self.s.accept_rate if self.s.accept_rate is not None else DEFAULT_ACCEPT_RATE
        return (self._taken + prior * PRIOR_TOKENS) / (self._judged + PRIOR_TOKENS)

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
        self.next_blocks.pop(seq.index, None)
        if self.draft is not None and not self.draft_hung and seq.index in self.draft.gens:
            self.draft.drop(seq.index)
