"""S2D's `draft_exit_threshold: auto`, measured on the compiled plan: `tune_exit_threshold`."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from mirror_sd import progress
from mirror_sd.partition.spec_config import EXIT_THRESHOLDS

if TYPE_CHECKING:
    from mirror_sd.runtime.plan import Plan

EXIT_CALIBRATION_PROMPT = 64  # tokens of the calibration text as the prompt
EXIT_CALIBRATION_TOKENS = 32  # and new tokens per threshold measured


def tune_exit_threshold(plan: Plan, ids: list[int]) -> None:
    """A short speculative generation at each of EXIT_THRESHOLDS on the calibration text
    (after one untimed warm-up), timed end to end, so that acceptance and cost are measured
    together (an exit that fires often but proposes worse tokens loses here); the plan keeps
    the fastest (tokens/s) and its report the rates. A plan without a draft is left as is."""
    if plan.draft is None:
        return
    ids = list(ids)[:EXIT_CALIBRATION_PROMPT]
    run = functools.partial(plan.generate, ids, mode="speculative", eos_token_id=[])
    run(4, draft_exit_threshold=EXIT_THRESHOLDS[0])
    rates = {}
    for t in progress.bar(EXIT_THRESHOLDS, "S2D exit threshold", unit="threshold"):
        rates[t] = run(EXIT_CALIBRATION_TOKENS, draft_exit_threshold=t).stats.tokens_per_s
    best = max(rates, key=rates.get)
    plan.spec = plan.spec.with_(draft_exit_threshold=best)
    plan.draft.configure(True, best)
    plan.report.exit_thresholds = rates
