"""What every device backend offers the runtime: a model runner with its own KV cache.

A `ModelRunner` holds one model's weights and a static KV cache on one device and
runs new rows against the cache. Inputs and outputs are CPU torch tensors (a few
hundred bytes of ids in, logits out); everything else stays on the device.

    forward(ids (1, T) int64, position_ids (1, T) int64, mask (1, T, length + T) bool)
        -> logits (T, V) float32; the T rows' K/V are appended (length += T)
    rollback(n)          forget rows from n on (O(1))
    keep(start, rows)    compact rows[i] -> start + i; length = start + len(rows)
    set_threads(n)       (optional) run the next forwards on n intra-op threads
    fill(ids, position_ids, mask)
                         (optional) append the T rows' K/V without computing logits: a
                         prefill, which needs none (the LM head over a long prompt's rows
                         costs as much as several decode steps)

`SplitRunner` adds the target's split at the exit layer ℓe:
    forward_prefix(ids, position_ids, mask) -> hidden (1, T, D) after layer ℓe-1
    exit_logits(hidden) -> (T, V) from the exit head
    forward_suffix(hidden, position_ids, mask) -> logits (T, V); appends the rows
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch


def fill(runner: ModelRunner, ids: torch.Tensor, position_ids: torch.Tensor,
         mask: torch.Tensor) -> None:  # fmt: skip
    """Append rows to `runner`'s cache, without logits where the runner can skip them."""
    skip_head = getattr(runner, "fill", None)
    if skip_head is not None:
        skip_head(ids, position_ids, mask)
    else:
        runner.forward(ids, position_ids, mask)


def set_threads(runner: object, threads: int | None) -> None:
    """Run `runner`'s next forwards on `threads` threads (the thread budget's call, made while
    the runner is idle). None, or a runner without threads (a simulated device), is a no-op."""
    apply = getattr(runner, "set_threads", None)
    if threads is not None and apply is not None:
        apply(threads)


class DeviceError(RuntimeError):
    """A device failed to run a stage (raised, timed out or returned malformed output)."""


@runtime_checkable
class ModelRunner(Protocol):
    name: str  # e.g. "draft on npu (onnxruntime CPUExecutionProvider)"
    length: int
    max_len: int
    vocab_size: int

    def forward(
        self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor: ...

    def rollback(self, length: int) -> None: ...

    def keep(self, start: int, rows: Sequence[int]) -> None: ...


@runtime_checkable
class SplitRunner(ModelRunner, Protocol):
    exit_layer: int

    def forward_prefix(
        self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor: ...

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def forward_suffix(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor: ...


class RunnerWrapper:
    """Base of a `ModelRunner` that wraps `self.runner` and changes only `forward` (a trimmed
    head's expansion, S2D's early exits): the KV cache, length, rollback / keep and every
    backend attribute (`session`, `placement`, `model`, ...) are the wrapped runner's."""

    runner: ModelRunner

    @property
    def length(self) -> int:
        return self.runner.length

    @property
    def max_len(self) -> int:
        return self.runner.max_len

    def rollback(self, length: int) -> None:
        self.runner.rollback(length)

    def keep(self, start: int, rows: Sequence[int]) -> None:
        self.runner.keep(start, rows)

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found on the wrapper: backend details of the runner
        if name == "runner":  # not set yet (during unpickling / a failed __init__)
            raise AttributeError(name)
        return getattr(self.runner, name)
