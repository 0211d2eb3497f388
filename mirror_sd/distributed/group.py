"""`tensor_parallel: N` on a torch device: the checks, and the process group it runs in.

The ranks are started by `torchrun --nproc-per-node N` (it sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT); every rank runs the same script and calls
compile(). The backend follows the device: gloo for `device: cpu`, NCCL for CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from mirror_sd.distributed.tp import check_divisible
from mirror_sd.graphs.config import ModelConfig
from mirror_sd.partition import DeviceMapError, TorchSpec


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group."""

    rank: int
    world: int
    backend: str  # "gloo" | "nccl"
    device: str  # the torch device this rank computes on (cuda:<LOCAL_RANK> with NCCL)
    timeout_s: float


def backend_for(device: str) -> str:
    """gloo for the CPU, NCCL for CUDA; anything else cannot run tensor-parallel here."""
    kind = device.split(":")[0]
    return {"cpu": "gloo", "cuda": "nccl"}.get(kind, "")


def check(spec: TorchSpec, cfg: ModelConfig, source: str = "<dict>") -> None:
    """The map's `tensor_parallel` against the model, the launch and torch's backends.

    Raises:
        DeviceMapError: at `devices.<alias>.tensor_parallel`, saying what is wrong and how to fix it.
    """
    n, path = spec.tensor_parallel, f"devices.{spec.alias}.tensor_parallel"

    def fail(msg: str) -> DeviceMapError:
        return DeviceMapError(path, msg, source)

    backend = backend_for(spec.device)
    if not backend:
        raise fail(
            f"{n} ranks on {spec.device!r}: tensor parallelism runs on cpu (gloo) or cuda (NCCL)"
        )
    if not dist.is_available() or not getattr(dist, f"is_{backend}_available")():
        raise fail(f"this torch build has no {backend} backend for {spec.device!r}; "
                   "install a torch with it or set tensor_parallel: 1")  # fmt: skip
    why = check_divisible(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, n)
    if why:
        raise fail(
            f"{why}; use a tensor_parallel that divides {cfg.num_heads} and {cfg.num_kv_heads}"
        )
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        raise fail(f"{n} ranks, but this process was not started by torchrun (WORLD_SIZE is unset): "
                   f"run `torchrun --nproc-per-node {n} your_script.py`")  # fmt: skip
    if int(world) != n:
        raise fail(f"{n} ranks, but torchrun started {world} processes: "
                   f"use --nproc-per-node {n} or tensor_parallel: {world}")  # fmt: skip


def join(spec: TorchSpec) -> TPGroup:
    """Start (or join the already started) default process group; call after `check`."""
    backend = backend_for(spec.device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=spec.tp_timeout_s))
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = f"cuda:{local}" if backend == "nccl" else "cpu"
    return TPGroup(dist.get_rank(), dist.get_world_size(), backend, device, spec.tp_timeout_s)
