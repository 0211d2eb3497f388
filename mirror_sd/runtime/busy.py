"""A plan runs one generation (or one batch session) at a time."""

from __future__ import annotations


class PlanBusyError(RuntimeError):
    """generate()/stream() was called while another generation runs on the same plan."""


BUSY = (
    "this plan is already generating; plans run one generation at a time — "
    "wait for it, or compile a second plan for concurrent requests"
)
