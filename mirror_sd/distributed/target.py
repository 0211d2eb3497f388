"""compile()'s tensor-parallel target: `tensor_parallel: N` on the target's torch device.

Every rank (started by torchrun) runs compile(). Each loads the target, takes its shard
(tp.py) and joins the group; rank 0 gets a `TPRunner` and goes on building the plan (draft,
profile, scheduler); ranks > 0 serve rank 0's commands inside compile() and leave the process
when rank 0's plan closes (or its process exits): compile() does not return on them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist

from mirror_sd.backends.registry import backend_for
from mirror_sd.devices.torch_device import TorchDevice, TorchRunner
from mirror_sd.distributed.group import check, join
from mirror_sd.distributed.runner import TPRunner, follow
from mirror_sd.distributed.tp import shard_
from mirror_sd.graphs.config import load_config
from mirror_sd.graphs.loader import load_model
from mirror_sd.partition import DeviceMapError, TorchSpec
from mirror_sd.runtime.profiling import agreement_by_layer, lens_layers


def is_tp(spec: object) -> bool:
    """Whether a map entry asks for a tensor-parallel model (its torch device's ranks)."""
    host = backend_for(spec).torch_spec(spec)
    return host is not None and host.tensor_parallel > 1


def check_plan(t_spec: object, d_spec: object | None, needs_model: bool, source: str) -> None:
    """What a TP plan cannot do yet, as DeviceMapErrors: a TP draft, and exit heads or
    vocabulary trims built from the target's whole torch model."""
    if d_spec is not None and is_tp(d_spec):
        raise DeviceMapError(f"devices.{d_spec.alias}.tensor_parallel",
                             "applies to the target only; give the draft a device with "
                             "tensor_parallel: 1", source)  # fmt: skip
    if is_tp(t_spec) and needs_model:
        raise DeviceMapError(f"devices.{t_spec.alias}.tensor_parallel",
                             "a tensor-parallel target has no whole torch model for trained exit "
                             "heads or vocabulary trims: use exit_head: lm_head with "
                             "exit_vocab_size: 0 and draft_vocab_size: 0", source)  # fmt: skip


def tp_target_runner(spec: TorchSpec, folder: Path, exit_layer: int, max_len: int,
                     lens_ids: list[int] | None, source: str = "<dict>"
                     ) -> tuple[None, TPRunner, str, dict | None]:  # fmt: skip
    """(None, runner, label, lens agreement or None) on rank 0; on ranks > 0 it serves rank 0
    and ends the process (status 0) when told to stop: `os._exit` after flushing, not
    SystemExit, because interpreter teardown destroyed gloo's objects while their threads
    were joinable and aborted a follower in about one launch of four ("terminate called
    without an active exception").

    Raises:
        DeviceMapError: world size, divisibility or backend do not fit (group.check).
    """
    check(spec, load_config(folder), source)
    group = join(spec)
    model = load_model(folder, spec.dtype)
    lens = None
    if group.rank == 0 and lens_ids:  # the logit lens needs the whole model: before sharding
        lens = agreement_by_layer(model, lens_ids, list(lens_layers(model.num_layers)))
    shard_(model, group.rank, group.world)
    threads = spec.threads or max(1, (os.cpu_count() or 1) // group.world)
    dev = TorchDevice(group.device, threads if group.device == "cpu" else None, spec.dtype)
    inner = TorchRunner(
        model, dev, max_len, exit_layer=exit_layer, name=f"target rank {group.rank}"
    )
    if group.rank != 0:
        follow(inner, group)
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    runner = TPRunner(inner, group)
    return None, runner, f"{dev.describe()} x{group.world} tensor-parallel ({group.backend})", lens
