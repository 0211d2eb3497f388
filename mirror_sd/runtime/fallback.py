"""The model draft as a `DraftSource`: one proposer protocol for the model and retrieval.

`ModelDraft.propose` runs `DraftEngine.draft_chain` on the draft pipeline and waits for it
under the plan's `draft_timeout_s` (`await_draft`). A draft that fails, hangs or
has been dropped proposes nothing, so the round falls back to target-only decoding with the
same output. The scheduler composes it with a retrieval source through `Combined`
(SAM-Decoding's rule: retrieval when its match is long enough, else the model), so a new
proposer needs no change to the round loop. The branch rollouts and commits of mirror rounds
stay on `DraftEngine` (the sibling protocol: they answer the exit head, not the sequence).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout

from mirror_sd.runtime.draft_engine import DraftEngine
from mirror_sd.runtime.draft_policy import NEVER_STOP, DraftPolicy
from mirror_sd.runtime.drafters.base import Proposal, check_max_tokens
from mirror_sd.runtime.pipelines import Pipeline
from mirror_sd.runtime.tracing import Tracer


class DraftFailed(Exception):
    """Internal: the draft pipeline failed; the scheduler falls back to target-only."""


def await_draft(fut, timeout_s: float, fail: Callable[..., None]):
    """The draft future's result. A timeout (`fail(why, hung=True)`) or any exception from
    the device (`fail(why)`) raises DraftFailed after `fail` has dropped the draft: the
    output must not depend on the draft device (both schedulers use this)."""
    try:
        return fut.result(timeout=timeout_s)
    except FutureTimeout:
        fail(f"draft step exceeded draft_timeout_s={timeout_s}", hung=True)
    except Exception as exc:  # any device error: the output must not depend on it
        fail(f"{type(exc).__name__}: {exc}")
    raise DraftFailed


def drop_draft(state, tracer: Tracer, pipe: Pipeline, why: str, hung: bool = False) -> None:
    """Drop the draft for the rest of a generation: `state.fallback = why` (and
    `state.draft_hung`), an instant in the trace, a warning. Both schedulers and `ModelDraft`
    drop it through here."""
    state.fallback, state.draft_hung = why, hung
    tracer.instant(pipe.device, pipe.name, "draft failed: target-only fallback", tracer.now(),
                   why=why)  # fmt: skip
    warnings.warn(
        f"draft device failed ({why}); continuing target-only, output unchanged", stacklevel=4
    )


class ModelDraft:
    """Chain drafts of a `DraftEngine` on its pipeline, as a `DraftSource` named "draft".

    A step past `timeout_s` or a device error drops the draft (`drop_draft` on the scheduler's
    `state`, whose `fallback` also says whether the draft may still run). It holds the state,
    never the scheduler: no reference cycle keeps a generation's runners alive after it.
    """

    name = "draft"

    def __init__(self, engine: DraftEngine, pipe: Pipeline, tracer: Tracer,
                 timeout_s: float, state,
                 stop: DraftPolicy = NEVER_STOP) -> None:  # fmt: skip
        self.engine, self.pipe, self.tracer = engine, pipe, tracer
        self.timeout_s, self.state, self.stop = timeout_s, state, stop
        self.committed: list[int] = []

    def reset(self, context: Sequence[int]) -> None:
        self.committed = list(context)

    def extend(self, tokens: Sequence[int]) -> None:
        self.committed += tokens

    def propose(self, max_tokens: int) -> Proposal:
        """Up to `max_tokens` draft tokens (fewer when the stop policy ends the chain), with
        the distributions they were sampled from; empty when the draft is dropped or fails."""
        check_max_tokens(max_tokens)
        if self.state.fallback is not None or max_tokens == 0:
            return Proposal.empty(self.name)
        fut = self.pipe.submit(self.tracer, "draft.chain", self.engine.draft_chain,
                               self.committed, max_tokens, self.stop)  # fmt: skip
        try:
            d = await_draft(fut, self.timeout_s, self._fail)
        except DraftFailed:  # the draft is dropped: target-only rounds from here
            return Proposal.empty(self.name)
        return Proposal(tuple(d.tokens), 0, self.name, q=d.q)

    def _fail(self, why: str, hung: bool = False) -> None:
        drop_draft(self.state, self.tracer, self.pipe, why, hung)
