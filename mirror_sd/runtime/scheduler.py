"""The verification scheduler: the round loop of docs/algorithm.md, for every batch size.

Batch 1 is a batch of one: `plan.generate(prompt)`, `plan.generate([...])` and the server's
`batch_session()` all run this loop. One round over the live sequences:

    PROPOSE   per sequence without a block: its retrieval source's proposal when the match
              is long enough (`Combined`), else the block the Amphista heads read off the
              target's hidden state last round (`head_drafts`), else the model draft (all of
              those in one packed chain on the draft pipeline, `DraftEngine.chain`)
    VERIFY    target pipeline: the blocks [x_n, d_1..d_γ] of all live sequences packed into
              one forward (`PackedCache`); each sequence gets its own verdict.
              mirror: PREFIX (layers [0, ℓe)) + EXIT head -> top-κ candidates per position
              (the token channel), then the SUFFIX || every sequence's branch rollouts on the
              draft (one tree-masked forward per step), and per sequence the RENDEZVOUS: a hit
              branch's rollout is its next block
    COMMIT    per sequence: the target keeps x_n, d_1..d_a (rejected rows become holes)
    LEAVE     sequences that hit EOS, a stop string or their budget leave the batch; others
              may join before any round (continuous batching)

`speculative` drafts then verifies (no overlap); `autoregressive` runs the target alone.
Every sequence has its own budget, sampling settings and generators, so each draws as it
would alone. Single-threaded and deterministic; a draft that raises, hangs or returns
malformed output drops the whole batch to target-only decoding with the same tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from mirror_sd.devices.base import SplitRunner, set_threads
from mirror_sd.partition.batch_policy import BatchSetting, setting_for
from mirror_sd.partition.cost_model import DEFAULT_ACCEPT_RATE
from mirror_sd.partition.threads import ThreadBudget
from mirror_sd.runtime.acceptance import Sampling, Verdict, probs, verify_greedy, verify_sampling
from mirror_sd.runtime.branches import exit_candidates, plan_branches
from mirror_sd.runtime.draft_engine import Draft, DraftEngine
from mirror_sd.runtime.draft_policy import NEVER_STOP, DraftPolicy
from mirror_sd.runtime.drafters import Combined, DraftSource
from mirror_sd.runtime.fallback import DraftFailed, await_draft, drop_draft
from mirror_sd.runtime.head_drafts import HeadDrafts, Heads
from mirror_sd.runtime.packing import PackedCache
from mirror_sd.runtime.pipelines import Pipeline
from mirror_sd.runtime.token_tree import TokenTree, verify_tree_greedy
from mirror_sd.runtime.tracing import Tracer

PRIOR_TOKENS = 8  # weight of the plan's α prior in the running acceptance estimate


@dataclass(frozen=True)
class RoundSettings:
    """The per-generation settings the round loop reads (from SpecConfig)."""

    mode: str  # mirror | speculative | autoregressive
    gamma: int  # γ
    kappa: int  # κ
    budget: int  # branches rolled out per round
    reuse: bool
    draft_timeout_s: float
    retrieval_min_match: int = 3
    draft_stop: DraftPolicy = NEVER_STOP  # bounds chain drafts and each branch's rollout
    accept_rate: float | None = None  # the plan's measured α: prior for ranking branches
    threads: ThreadBudget | None = None  # threads per pipeline and phase; None: leave as built
    by_batch: tuple[BatchSetting, ...] = ()  # mode and γ per live batch size; () = these
    # speculative rounds: per depth, the draft's next-best tokens verified as leaves
    tree_siblings: tuple[int, ...] = ()
    draft_retry_rounds: int = 0  # after a draft error: target-only rounds before a retry; 0 never

    def at(self, live: int) -> RoundSettings:
        """The settings of a round with `live` sequences (`partition.batch_policy`)."""
        chosen = setting_for(self.by_batch, live)
        if chosen is None or (chosen.mode, chosen.num_draft_tokens) == (self.mode, self.gamma):
            return self
        return replace(self, mode=chosen.mode, gamma=chosen.num_draft_tokens)


@dataclass
class RoundLog:
    accepted: int
    committed: int  # tokens this round added (a + 1)
    hit: bool | None  # None when no branches were rolled out
    t_pre: float = 0.0
    t_suf: float = 0.0
    t_draft: float = 0.0  # draft busy time attributable to this round
    exposed: float = 0.0  # draft time on the critical path
    branches: int = 0
    source: str = "target"  # who proposed this round's block: draft | branch | <retrieval> | target
    drafted: int = 0  # tokens proposed this round (the block's length; < γ after an early stop)
    # mirror: the verdict's place in the full branch ranking (0 = the most valuable branch);
    # a budget B would have hit iff hit_rank < B. None: no ranking, or the verdict was not
    # among the exit head's top-κ. Lets a replay ask what another budget would have hit.
    hit_rank: int | None = None
    rollout_steps: int = 0  # mirror: batched draft steps the branch rollouts took (≤ γ)


@dataclass
class SeqState:
    """One sequence of a batch: its committed tokens and what it has produced so far."""

    index: int  # its place in the caller's list of prompts (any new int for a joiner)
    committed: list[int]  # prompt + new tokens
    max_new_tokens: int
    sampling: Sampling  # its own logits processing (greedy when temperature is 0)
    verify_gen: torch.Generator
    draft_gen: torch.Generator  # draws its draft tokens when sampling
    retrieval: DraftSource | None = None  # its own retrieval source (`drafters.sources.fork`)
    produced: list[int] = field(default_factory=list)
    rounds: list[RoundLog] = field(default_factory=list)
    finished_at: float | None = None  # tracer time when it left the batch
    reused: int = 0  # prompt rows the target's cache held already (prefix caching)
    fault: str | None = None  # the first draft failure while it was live (output unchanged)


@dataclass
class RunState:
    fallback: str | None = None  # why the draft is dropped now, if it is
    hung_call: Future | None = None  # the draft call that timed out (it may return later)
    faults: int = 0  # draft failures in this round loop's life
    down_rounds: int = 0  # target-only rounds since the last one

    @property
    def draft_hung(self) -> bool:
        return self.hung_call is not None


class VerificationScheduler:
    def __init__(
        self,
        target: SplitRunner,
        target_pipe: Pipeline,
        draft: DraftEngine | None,
        draft_pipe: Pipeline | None,
        settings: RoundSettings,
        tracer: Tracer,
        exit_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
        target_cache: PackedCache | None = None,
        heads: Heads | None = None,
    ):
        """`target_cache`: the target's packed cache kept from earlier generations (prefix
        caching, `Plan.packed_cache`); a new, empty one when None. `heads`: Amphista heads
        on the target's hidden state at ℓe, which propose each sequence's next block
        (`runtime.head_drafts`)."""
        self.target = target_cache if target_cache is not None else PackedCache(target)
        self.tp = target_pipe
        self.draft, self.dp = draft, draft_pipe
        self.base, self.s, self.tracer = settings, settings, tracer  # s: this round's (`at`)
        self.exit_logits = exit_head or target.exit_logits  # hidden (1, T, D) -> (T, V)
        self.state = RunState()
        self._live: list[SeqState] = []
        self.next_blocks: dict[int, Draft] = {}  # mirror: a hit branch's rollout per sequence
        self.heads = HeadDrafts(heads) if heads is not None else None
        self._gates: dict[int, Combined] = {}  # per sequence: its retrieval, gated by match
        self._judged = self._taken = 0  # draft tokens verified / accepted (running α)
        self._produced = 0  # tokens committed over all sequences (the "tokens" counter)

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
        self._live = live  # whom a draft failure hits (`_fail`)
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
                if seq.index in self._gates:
                    self._gates[seq.index].extend(tokens)
                self._produced += len(tokens)
            self.tracer.counter("tokens", self.tracer.now(), committed=self._produced)
            yield new
            for seq in [s for s in live if len(s.produced) >= s.max_new_tokens or done(s)]:
                self._leave(seq)
                live.remove(seq)

    # --- phases -------------------------------------------------------------------------
    def _threads(self, overlapped: bool = False) -> None:
        """Apply the thread budget for the next phase: every core of a physical device to the
        pipeline that runs alone; the budget's overlap counts while mirror overlaps the suffix
        and the rollouts. Called only while both runners are idle."""
        b = self.s.threads
        if b is not None:
            set_threads(self.target.runner, b.target(overlapped))
            if self.draft is not None:
                set_threads(self.draft.runner, b.draft(overlapped))

    def _draft_alive(self) -> bool:
        return (
            self.draft is not None
            and self.state.fallback is None
            and self.s.mode != "autoregressive"
        )

    def _fail(self, why: str, hung: Future | None = None) -> None:
        drop_draft(self.state, self.tracer, self.dp, why, hung)
        for seq in self._live:
            seq.fault = seq.fault or why

    def _retry_draft(self) -> None:
        """After a draft error (never a hang: the hung call still holds the device), try the
        draft again once it has sat out `draft_retry_rounds` × 2^(errors - 1) rounds (at most
        64×). Its rows are suspect: it restarts from an empty cache, and each live sequence is
        fed again from its committed tokens at its next drafting step."""
        st, n = self.state, self.s.draft_retry_rounds
        if st.fallback is None or st.draft_hung or self.draft is None or n <= 0:
            return
        st.down_rounds += 1
        if st.down_rounds <= n * 2 ** min(st.faults - 1, 6):
            return
        self.draft.restart()
        self.tracer.instant(self.dp.device, self.dp.name, "draft retried", self.tracer.now(),
                            after=st.fallback)  # fmt: skip
        st.fallback, st.down_rounds = None, 0

    def _draft_result(self, fut):
        return await_draft(fut, self.s.draft_timeout_s, self._fail)

    def _propose(self, live: list[SeqState]) -> tuple[dict[int, Draft], float]:
        """Each live sequence's block and the model's drafting time: a hit branch's rollout
        kept from the last round, else its retrieval proposal when the match is long enough,
        else the heads' block from the last round, else the model draft (all of those in one
        chain); empty without a proposer."""
        blocks = {s.index: self.next_blocks.pop(s.index, None) for s in live}
        heads = {s.index: self.heads.take(s.index, self.s.gamma) if self.heads else None
                 for s in live}  # fmt: skip
        empty = Draft([], None, source="target")
        if self.s.mode == "autoregressive":
            return {k: empty for k in blocks}, 0.0
        need = {}
        for seq in live:
            if blocks[seq.index] is not None:
                continue
            gate = self._gates.get(seq.index)
            p = gate.propose(self.s.gamma) if gate is not None else None
            if p is not None and p.tokens:
                blocks[seq.index] = Draft(list(p.tokens), p.q, source=p.source)
            elif heads[seq.index] is not None:
                blocks[seq.index] = heads[seq.index]
            else:
                need[seq.index] = seq.committed
        t_draft = 0.0
        if need and self._draft_alive():
            t0 = self.tracer.now()
            siblings = self.s.tree_siblings if self.s.mode == "speculative" else ()
            fut = self.dp.submit(self.tracer, "draft.chain", self.draft.chain, need,
                                 self.s.gamma, self.s.draft_stop, siblings)  # fmt: skip
            with contextlib.suppress(DraftFailed):  # dropped: empty blocks, target-only
                blocks.update(self._draft_result(fut))
            t_draft = self.tracer.now() - t0
        return {k: b if b is not None and b.tokens else empty for k, b in blocks.items()}, t_draft

    def _verify(self, seq: SeqState, block: Draft, logits: torch.Tensor) -> Verdict:
        """The sequence's verdict on its block; logits (len(block) + 1, V)."""
        d = block.tokens
        if seq.sampling.greedy:
            v = verify_greedy(d, logits)
        else:
            v = verify_sampling(d, block.q, probs(logits, seq.sampling), seq.verify_gen)
        self._tally(len(d), v.accepted)
        return v

    def _tally(self, drafted: int, accepted: int) -> None:
        """The running α estimate: of `drafted` chain tokens, the first `accepted` were taken
        (tokens up to the first rejection are the ones judged)."""
        if drafted:
            self._judged += min(accepted + 1, drafted)
            self._taken += accepted

    def _observe(self, seq: SeqState, rows: list[int], logits: torch.Tensor) -> None:
        """Hand the verified block and the target's logits to the sequence's retrieval
        source (Token Recycling learns its successors from them)."""
        gate = self._gates.get(seq.index)
        if gate is not None:
            gate.observe(rows, logits)

    def _commit(self, seq: SeqState, block: Draft, v: Verdict) -> list[int]:
        """The target keeps x_n, d_1..d_a; the round adds d_1..d_a and the correction."""
        self.target.truncate(seq.index, len(seq.committed) + v.accepted)
        return [*block.tokens[: v.accepted], v.correction]

    def _round(self, live: list[SeqState]) -> dict[int, list[int]]:
        self.s = self.base.at(len(live))
        self._retry_draft()
        self._threads()
        blocks, t_draft = self._propose(live)
        mirror = self.s.mode == "mirror" and self._draft_alive()
        if mirror and all(b.tokens for b in blocks.values()):
            new = self._mirror_round(live, blocks, t_draft)
        else:
            new = self._plain_round(live, blocks, t_draft)
        now = self.tracer.now()
        logs = [s.rounds[-1] for s in live]
        self.tracer.counter("accepted", now, accepted=sum(g.accepted for g in logs))
        if any(g.hit is not None for g in logs):
            self.tracer.counter("hits", now, hit=sum(bool(g.hit) for g in logs))
        self.tracer.counter("batch", now, live=len(live))
        return new

    def _plain_round(self, live, blocks, t_draft: float) -> dict[int, list[int]]:
        """Speculative (or γ = 0) verification of every block in one target forward; a
        greedy block with sibling leaves (`Draft.alts`) is verified as a token tree."""
        t1 = self.tracer.now()
        trees = {s.index: TokenTree.with_siblings(blocks[s.index].tokens, blocks[s.index].alts,
                                                  root=s.committed[-1])
                 for s in live if blocks[s.index].alts and s.sampling.greedy}  # fmt: skip
        rows = {s.index: trees[s.index].tokens if s.index in trees
                else [s.committed[-1], *blocks[s.index].tokens] for s in live}  # fmt: skip
        parents = {k: t.parents for k, t in trees.items()}
        hidden = None
        if self._heads_on():

            def verify():  # the hidden state at ℓe is what the heads read
                h = self.target.forward_prefix(rows, parents)
                return h, self.target.forward_suffix(h)

            hidden, logits = self.tp.submit(self.tracer, "target.verify", verify).result()
            hidden = self.target.split(rows, hidden[0])
        else:
            logits = self.tp.submit(self.tracer, "target.verify", self.target.forward, rows,
                                    parents).result()  # fmt: skip
        t2 = self.tracer.now()
        new = {}
        for seq in live:
            block, tree = blocks[seq.index], trees.get(seq.index)
            source = block.source
            self._observe(seq, rows[seq.index], logits[seq.index])
            if tree is None:
                v = self._verify(seq, block, logits[seq.index])
                new[seq.index] = self._commit(seq, block, v)
            else:
                tv = verify_tree_greedy(tree, logits[seq.index])
                chain = next((j for j, i in enumerate(tv.accepted) if i != j + 1), len(tv.accepted))
                self._tally(len(block.tokens), chain)  # α counts the chain's tokens only
                self.target.prune(seq.index, len(seq.committed) - 1, tv.keep_rows)
                new[seq.index], v = [*tv.tokens, tv.correction], tv.as_verdict()
                if any(i > len(block.tokens) for i in tv.accepted):
                    source = f"{source}-tree"  # the accepted path took a sibling leaf
            if hidden is not None:  # the last accepted row: a chain's a-th, a tree's node
                last = v.accepted if tree is None else tv.keep_rows[-1]
                self._heads_after(seq, hidden[seq.index][last])
            seq.rounds.append(RoundLog(
                v.accepted, v.accepted + 1, None, t_suf=t2 - t1, t_draft=t_draft,
                exposed=t_draft, source=source, drafted=len(block.tokens),
            ))  # fmt: skip
        return new

    def _mirror_round(self, live, blocks, t_draft: float) -> dict[int, list[int]]:
        """Prefix + exit head over all blocks, then the suffix on the target while the draft
        rolls out every sequence's planned branches; per sequence the verdict, the
        rendezvous and, on a hit, the next block."""
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
        self.tracer.flow(
            "token channel", (self.tp.device, self.tp.name, t1), (self.dp.device, self.dp.name, t1)
        )
        logits = suffix.result()
        t2 = self.tracer.now()
        verdicts, new = {}, {}
        heads = self.target.split(rows, hidden[0]) if self._heads_on() else None
        for seq in live:
            block = blocks[seq.index]
            self._observe(seq, rows[seq.index], logits[seq.index])
            v = verdicts[seq.index] = self._verify(seq, block, logits[seq.index])
            new[seq.index] = self._commit(seq, block, v)
            rank = next((i for i, b in enumerate(ranked[seq.index])
                         if (b.depth, b.token) == (v.accepted, v.correction)), None)  # fmt: skip
            seq.rounds.append(RoundLog(
                v.accepted, v.accepted + 1, False, t_pre=t1 - t0, t_suf=t2 - t1,
                t_draft=t_draft, exposed=t_draft, branches=len(work[seq.index][2]),
                source=block.source, drafted=len(block.tokens), hit_rank=rank,
            ))  # fmt: skip
            if heads is not None:  # the next block when no branch hits
                self._heads_after(seq, heads[seq.index][v.accepted])
        try:
            rollouts = self._draft_result(rollout)
        except DraftFailed:
            return new
        r_start, r_end = rollout.span
        t3 = max(r_end, t2)
        self.tracer.flow(
            "rendezvous", (self.dp.device, self.dp.name, t3), (self.tp.device, self.tp.name, t3)
        )
        for seq in live:
            log, v = seq.rounds[-1], verdicts[seq.index]
            log.t_draft += r_end - r_start
            log.exposed += max(0.0, r_end - suffix.span[1])
            mine = rollouts[seq.index]  # one per branch, in the order of ranked[:budget]
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

    def _heads_on(self) -> bool:
        return self.heads is not None and self.s.mode != "autoregressive"

    def _heads_after(self, seq: SeqState, hidden_row: torch.Tensor) -> None:
        """The heads' block for the sequence's next round; sibling leaves (a tree) only where
        a speculative round verifies them (greedy)."""
        tree = self.s.mode == "speculative" and seq.sampling.greedy
        self.heads.after(seq.index, hidden_row, self.s.gamma, self.s.tree_siblings if tree else ())

    def _accept_rate(self) -> float:
        """Running estimate of the per-token acceptance α of the draft tokens verified so far,
        with a prior worth PRIOR_TOKENS tokens at the plan's α (its profile, else the cost
        model's DEFAULT_ACCEPT_RATE: one default for both)."""
        prior = self.s.accept_rate if self.s.accept_rate is not None else DEFAULT_ACCEPT_RATE
        return (self._taken + prior * PRIOR_TOKENS) / (self._judged + PRIOR_TOKENS)

    def _join(self, seq: SeqState) -> None:
        """A sequence joins: its prompt (but the last token) is prefilled on the target, past
        the rows a retained prefix gives it (prefix caching); the draft feeds it at its first
        drafting step; its retrieval source starts on it."""
        self._threads()
        seq.reused = self.target.add(seq.index, seq.committed)
        self.tp.submit(self.tracer, "target.prefill", self.target.fill, seq.index,
                       seq.committed[seq.reused : -1]).result()  # fmt: skip
        if self.draft is not None and not self.state.draft_hung:
            self.draft.add(seq.index, seq.sampling, seq.draft_gen, seq.committed)
        if seq.retrieval is not None:
            gate = Combined(seq.retrieval, None, threshold=self.s.retrieval_min_match)
            gate.reset(seq.committed)
            self._gates[seq.index] = gate

    def _leave(self, seq: SeqState) -> None:
        """The sequence is done: its rows on both devices become holes."""
        seq.finished_at = self.tracer.now()
        self.target.drop(seq.index)
        self.next_blocks.pop(seq.index, None)
        self._gates.pop(seq.index, None)
        if self.heads is not None:
            self.heads.drop(seq.index)
        if self.draft is not None and not self.state.draft_hung and seq.index in self.draft.gens:
            self.draft.drop(seq.index)
