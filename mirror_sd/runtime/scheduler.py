"""The verification scheduler: the round state machine of docs/algorithm.md.

Single-threaded and deterministic: it owns the committed sequence, submits stage runs
to the two pipelines, and decides. One round (mirror mode):

    PREFIX    target layers [0, ℓe) on the block [x_n, d_1..d_γ]      (target pipeline)
    EXIT      exit head -> top-κ candidates per position; token channel -> draft
    OVERLAP   target suffix [ℓe, N) + LM head        || branch rollouts (draft pipeline)
    VERIFY    accepted length a, correction c*
    RENDEZVOUS  branch (a, c*) rolled out?  hit: its rollout is the next block
    COMMIT    target keeps a + 1 block rows; draft keeps the winning branch's rows

`speculative` mode drafts γ tokens, then verifies (no overlap); `autoregressive` runs
the target alone. A draft that raises, hangs or returns malformed output drops the
generation to target-only decoding; the tokens stay exactly the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from mirror_sd.devices.base import SplitRunner, fill, set_threads
from mirror_sd.graphs.masks import causal_mask
from mirror_sd.partition.cost_model import DEFAULT_ACCEPT_RATE
from mirror_sd.partition.threads import ThreadBudget
from mirror_sd.runtime.acceptance import Sampling, Verdict, probs, verify_greedy, verify_sampling
from mirror_sd.runtime.branches import exit_candidates, plan_branches
from mirror_sd.runtime.draft_engine import Draft, DraftEngine, Rollout
from mirror_sd.runtime.draft_policy import NEVER_STOP, DraftPolicy
from mirror_sd.runtime.drafters import Combined, DraftSource
from mirror_sd.runtime.model_draft import DraftFailed, ModelDraft, await_draft, drop_draft
from mirror_sd.runtime.pipelines import Pipeline
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
class RunState:
    rounds: list[RoundLog] = field(default_factory=list)
    fallback: str | None = None  # why the draft was dropped, if it was
    draft_hung: bool = False


class VerificationScheduler:
    def __init__(
        self,
        target: SplitRunner,
        target_pipe: Pipeline,
        draft: DraftEngine | None,
        draft_pipe: Pipeline | None,
        settings: RoundSettings,
        sampling: Sampling,
        verify_gen: torch.Generator,
        tracer: Tracer,
        retrieval: DraftSource | None = None,
        exit_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.target, self.tp = target, target_pipe
        self.draft, self.dp = draft, draft_pipe
        self.s = settings
        self.sampling = sampling
        self.gen = verify_gen
        self.tracer = tracer
        self.state = RunState()
        # one proposer: retrieval when its match is long enough, else the model draft
        self.model = (
            ModelDraft(draft, draft_pipe, tracer, settings.draft_timeout_s, self.state,
                       settings.draft_stop)
            if draft is not None and draft_pipe is not None
            else None
        )  # fmt: skip
        self.proposer: DraftSource | None = (
            Combined(retrieval, self.model, threshold=settings.retrieval_min_match)
            if retrieval is not None
            else self.model
        )
        self.exit_logits = exit_head or target.exit_logits  # hidden (1, T, D) -> (T, V)
        self._judged = self._taken = 0  # draft tokens verified / accepted so far (running α)

    # --- public -------------------------------------------------------------------------
    def run(
        self, prompt: list[int], max_new_tokens: int, done: Callable[[list[int]], bool]
    ) -> Iterator[list[int]]:
        """Yield the tokens committed by each round until `done(new_tokens)` or the budget."""
        committed = list(prompt)
        self._threads(overlapped=False)
        self._prefill(committed)
        if self.proposer is not None:
            self.proposer.reset(committed)
        block: Draft | None = None
        produced: list[int] = []
        while len(produced) < max_new_tokens:
            new, block = self._round(committed, block)
            new = new[: max_new_tokens - len(produced)]
            committed += new
            produced += new
            if self.proposer is not None:
                self.proposer.extend(new)
            self.tracer.counter("tokens", self.tracer.now(), committed=len(produced))
            yield new
            if done(produced):
                return

    # --- phases -------------------------------------------------------------------------
    def _threads(self, overlapped: bool) -> None:
        """Apply the thread budget for the next phase: every core of a physical device to the
        pipeline that runs alone; the budget's overlap counts while mirror overlaps the two.
        Called only while both runners are idle."""
        b = self.s.threads
        if b is None:
            return
        set_threads(self.target, b.target(overlapped))
        if self.draft is not None:
            set_threads(self.draft.runner, b.draft(overlapped))

    def _prefill(self, committed: list[int]) -> None:
        """Target caches x_1..x_{n-1}; x_n opens the first block."""
        self.target.rollback(0)
        if len(committed) > 1:
            ids = torch.tensor([committed[:-1]])
            pos = torch.arange(len(committed) - 1).unsqueeze(0)
            self.tp.submit(self.tracer, "target.prefill", fill, self.target, ids, pos,
                           causal_mask(0, ids.shape[1])).result()  # fmt: skip

    def _draft_alive(self) -> bool:
        return (
            self.draft is not None
            and self.state.fallback is None
            and self.s.mode != "autoregressive"
        )

    def _fail(self, why: str, hung: bool = False) -> None:
        drop_draft(self.state, self.tracer, self.dp, why, hung)

    def _draft_result(self, fut):
        return await_draft(fut, self.s.draft_timeout_s, self._fail)

    def _verify(self, d: list[int], q: torch.Tensor | None, logits: torch.Tensor) -> Verdict:
        if self.sampling.greedy:
            return verify_greedy(d, logits)
        return verify_sampling(d, q, probs(logits, self.sampling), self.gen)

    def _propose(self, log: RoundLog) -> Draft | None:
        """The proposer's block for this round (None: nothing proposed, a target-only round)."""
        if self.proposer is None or self.s.mode == "autoregressive":
            return None
        t0 = self.tracer.now()
        p = self.proposer.propose(self.s.gamma)
        if p.source == ModelDraft.name:  # the model drafted (or failed trying): draft time
            log.t_draft = log.exposed = self.tracer.now() - t0
        return Draft(list(p.tokens), p.q, source=p.source) if p.tokens else None

    def _round(self, committed: list[int], block: Draft | None) -> tuple[list[int], Draft | None]:
        log = RoundLog(0, 0, None)
        self._threads(overlapped=False)
        if block is None:
            block = self._propose(log)
        if block is None:
            block = Draft([], None, source="target")
        log.source, log.drafted = block.source, len(block.tokens)
        if self.s.mode == "mirror" and block.tokens and self._draft_alive():
            new, nxt = self._mirror_round(committed, block, log)
        else:
            new, nxt = self._plain_round(committed, block, log), None
        self.state.rounds.append(log)
        self.tracer.counter("accepted", self.tracer.now(), accepted=log.accepted)
        if log.hit is not None:
            self.tracer.counter("hits", self.tracer.now(), hit=int(log.hit))
        return new, nxt

    def _accept_rate(self) -> float:
        """Running estimate of the per-token acceptance α of this generation's draft tokens,
        with a prior worth PRIOR_TOKENS tokens at the plan's α (its profile, else the cost
        model's DEFAULT_ACCEPT_RATE: one default for both)."""
        prior = self.s.accept_rate if self.s.accept_rate is not None else DEFAULT_ACCEPT_RATE
        return (self._taken + prior * PRIOR_TOKENS) / (self._judged + PRIOR_TOKENS)

    def _block_inputs(self, committed: list[int], d: list[int]):
        n = len(committed)
        ids = torch.tensor([[committed[-1], *d]])  # (1, γ + 1)
        pos = torch.arange(n - 1, n + len(d)).unsqueeze(0)
        return ids, pos, causal_mask(n - 1, len(d) + 1)

    def _commit_target(
        self, committed: list[int], v: Verdict, d: list[int], log: RoundLog
    ) -> list[int]:
        self.target.rollback(len(committed) + v.accepted)  # keep x_n, d_1..d_a
        log.accepted, log.committed = v.accepted, v.accepted + 1
        if d:  # acceptance counts for the running α estimate (tokens up to the first rejection)
            self._judged += min(v.accepted + 1, len(d))
            self._taken += v.accepted
        return [*d[: v.accepted], v.correction]

    def _plain_round(self, committed: list[int], block: Draft, log: RoundLog) -> list[int]:
        """Target-only (γ = 0) or vanilla speculative verification: one full target forward."""
        ids, pos, mask = self._block_inputs(committed, block.tokens)
        t0 = self.tracer.now()
        logits = self.tp.submit(
            self.tracer, "target.verify", self.target.forward, ids, pos, mask
        ).result()
        log.t_suf = self.tracer.now() - t0
        return self._commit_target(
            committed, self._verify(block.tokens, block.q, logits), block.tokens, log
        )

    def _mirror_round(self, committed: list[int], block: Draft, log: RoundLog):
        d = block.tokens
        ids, pos, mask = self._block_inputs(committed, d)
        t0 = self.tracer.now()

        def prefix_and_exit():
            h = self.target.forward_prefix(ids, pos, mask)  # (1, γ + 1, D)
            return h, exit_candidates(self.exit_logits(h), self.s.kappa)

        hidden, (cand_ids, cand_p) = self.tp.submit(
            self.tracer, "target.prefix+exit_head", prefix_and_exit
        ).result()
        t1 = self.tracer.now()
        log.t_pre = t1 - t0
        ranked = plan_branches(d, cand_ids, cand_p, cand_ids.numel(), self._accept_rate())
        branches = ranked[: self.s.budget]
        log.branches = len(branches)
        self._threads(overlapped=True)
        suffix = self.tp.submit(
            self.tracer, "target.suffix", self.target.forward_suffix, hidden, pos, mask
        )
        rollout = self.dp.submit(
            self.tracer, "draft.rollout", self.draft.rollout, committed, d, branches, self.s.gamma,
            self.s.draft_stop,
        )  # fmt: skip
        self.tracer.flow(
            "token channel", (self.tp.device, self.tp.name, t1), (self.dp.device, self.dp.name, t1)
        )
        logits = suffix.result()
        t2 = self.tracer.now()
        log.t_suf = t2 - t1
        verdict = self._verify(d, block.q, logits)
        log.hit_rank = next(
            (i for i, b in enumerate(ranked)
             if (b.depth, b.token) == (verdict.accepted, verdict.correction)),
            None,
        )  # fmt: skip
        new = self._commit_target(committed, verdict, d, log)
        try:
            rollouts: list[Rollout] = self._draft_result(rollout)
        except DraftFailed:
            return new, None
        r_start, r_end = rollout.span
        log.rollout_steps = max((len(r.draft.tokens) for r in rollouts), default=0)
        log.t_draft += r_end - r_start
        log.exposed += max(0.0, r_end - suffix.span[1])
        t3 = max(r_end, t2)
        # rollouts come one per branch, in the order given: ranked[:budget]
        rank = log.hit_rank
        hit = rollouts[rank] if rank is not None and rank < len(rollouts) else None
        log.hit = hit is not None
        self.tracer.flow(
            "rendezvous", (self.dp.device, self.dp.name, t3), (self.tp.device, self.tp.name, t3)
        )
        if hit is None or not self.s.reuse:
            return new, None
        self.draft.commit_branch(len(committed), verdict.accepted, hit)
        return new, Draft(hit.draft.tokens, hit.draft.q, source="branch")
