"""A failing draft device never changes the output: `await_draft` waits for a draft future
under the plan's `draft_timeout_s`, and on a timeout or any device error `drop_draft` drops the
draft (target-only rounds, the same tokens): after an error until the scheduler retries it
(`draft_retry_rounds`), after a timeout until the hung call returns (`Plan.retire`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout

from mirror_sd.runtime.pipelines import Pipeline
from mirror_sd.runtime.tracing import Tracer


class DraftFailed(Exception):
    """Internal: the draft pipeline failed; the scheduler falls back to target-only."""


def await_draft(fut, timeout_s: float, fail: Callable[..., None]):
    """The draft future's result. A timeout (`fail(why, hung=fut)`: the call still holds the
    device) or any exception from the device (`fail(why)`) raises DraftFailed after `fail`
    has dropped the draft: the output must not depend on the draft device."""
    try:
        return fut.result(timeout=timeout_s)
    except FutureTimeout:
        fail(f"draft step exceeded draft_timeout_s={timeout_s}", hung=fut)
    except Exception as exc:  # any device error: the output must not depend on it
        fail(f"{type(exc).__name__}: {exc}")
    raise DraftFailed


def drop_draft(state, tracer: Tracer, pipe: Pipeline, why: str, hung=None) -> None:
    """Drop the draft: `state.fallback = why` (and, for a call that hung, the call in
    `state.hung_call`), one more fault counted, an instant in the trace, a warning."""
    state.fallback = why
    if hung is not None:
        state.hung_call = hung
    state.faults, state.down_rounds = state.faults + 1, 0
    tracer.instant(pipe.device, pipe.name, "draft failed: target-only fallback", tracer.now(),
                   why=why)  # fmt: skip
    warnings.warn(
        f"draft device failed ({why}); continuing target-only, output unchanged", stacklevel=4
    )
