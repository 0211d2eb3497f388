"""Rank 0 drives, the other ranks follow: a tensor-parallel target behind the SplitRunner API.

`TPRunner` (rank 0) wraps this rank's `TorchRunner` over its shard. Each call that runs
layers first broadcasts the command and its inputs (ids, positions, mask, hidden state,
ℓe) to the other ranks, which run the same call on their shards (`follow`), the layers'
all-reduces meeting in between. The exit head and the LM head are whole on every rank, so
`exit_logits` runs on rank 0 alone. Rank 0's scheduler and the draft never see the other ranks.

Faults: every collective has the group's timeout (`tp_timeout_s`); a rank that died or hangs
makes rank 0's next call raise `DeviceError` naming the group and the timeout, and every later
call raise at once. A follower whose rank 0 is gone fails the same way and exits; torchrun
then ends the other ranks.
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from mirror_sd.devices.base import DeviceError
from mirror_sd.devices.torch_device import TorchRunner
from mirror_sd.distributed.group import TPGroup

STOP = "stop"


def _broadcast(group: TPGroup, msg: list[Any] | None) -> list[Any]:
    """Rank 0 sends `msg` ([op, args]); the other ranks receive it."""
    box = [msg]
    device = torch.device(group.device) if group.backend == "nccl" else None
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


class TPRunner:
    """`SplitRunner` on rank 0 of a tensor-parallel group (see the module doc)."""

    def __init__(self, inner: TorchRunner, group: TPGroup):
        self.inner, self.group = inner, group
        self.max_len, self.vocab_size = inner.max_len, inner.vocab_size
        self.n_layers = inner.model.num_layers
        self.hidden_size = inner.model.config.hidden_size
        self._dtype = inner.model.model.embed_tokens.weight.dtype
        self.name = f"{inner.name}, tensor-parallel over {group.world} ranks ({group.backend})"
        self.failed: str | None = None
        self.closed = False
        atexit.register(self.close)

    @property
    def length(self) -> int:
        return self.inner.length

    @property
    def exit_layer(self) -> int:
        return self.inner.exit_layer

    @exit_layer.setter
    def exit_layer(self, value: int) -> None:
        self.inner.exit_layer = value

    def set_threads(self, threads: int | None) -> None:
        self.inner.set_threads(threads)

    def _call(self, op: str, *args: Any, wire: tuple | None = None) -> Any:
        """Broadcast `op` with `wire` (default `args`) to the followers, then run it here."""
        if self.failed:
            raise DeviceError(f"tensor-parallel target failed earlier: {self.failed}")
        if self.closed:
            raise DeviceError("tensor-parallel target is closed (its ranks were released)")
        try:
            _broadcast(self.group, [op, (self.inner.exit_layer, *(wire or args))])
            return getattr(self.inner, op)(*args)
        except (RuntimeError, dist.DistBackendError) as e:
            self.failed = (
                f"tensor-parallel {op} over {self.group.world} {self.group.backend} ranks failed: "
                f"a rank died, or hung past the group's timeout ({self.group.timeout_s:g} s, "
                f"tp_timeout_s); see that rank's log ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})"
            )
            raise DeviceError(self.failed) from e

    def forward(self, ids, position_ids, mask):
        return self._call("forward", ids, position_ids, mask)

    def fill(self, ids, position_ids, mask) -> None:
        self._call("fill", ids, position_ids, mask)

    def forward_prefix(self, ids, position_ids, mask):
        return self._call("forward_prefix", ids, position_ids, mask)

    def exit_logits(self, hidden):
        # the head is whole on rank 0: no collective
        return self.inner.exit_logits(hidden.to(self._dtype))

    def forward_suffix(self, hidden, position_ids, mask):
        wire = (hidden.cpu(), position_ids, mask)  # the followers move it to their device
        return self._call("forward_suffix", hidden, position_ids, mask, wire=wire)

    def rollback(self, length: int) -> None:
        self._call("rollback", length)

    def keep(self, start: int, rows: Sequence[int]) -> None:
        self._call("keep", start, list(rows))

    def close(self) -> None:
        """Tell the other ranks to stop (once); they return from `follow` and exit."""
        if self.closed or self.failed:
            return
        self.closed = True
        with contextlib.suppress(RuntimeError):  # the group is gone: torchrun ends the rest
            _broadcast(self.group, [STOP, ()])


def follow(inner: TorchRunner, group: TPGroup) -> int:
    """Ranks > 0: run rank 0's commands on this rank's shard until it says stop.

    Returns the number of commands run. Raises whatever a collective raises (a timeout when
    rank 0 is gone), which ends this process.
    """
    done = 0
    while True:
        op, args = _broadcast(group, None)
        if op == STOP:
            return done
        inner.exit_layer, *rest = args
        if op == "forward_suffix":  # the hidden state, to this rank's device and dtype
            w = inner.model.model.embed_tokens.weight
            rest[0] = rest[0].to(w.device, w.dtype)
        getattr(inner, op)(*rest)
        done += 1
