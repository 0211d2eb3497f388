"""TorchDevice: runs a `CausalLM` (target or draft) with torch on cpu / cuda:N / mps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mirror_sd.graphs.model import CausalLM


class DeviceUnavailableError(RuntimeError):
    """The torch device a map names (cuda:N, mps) is not present on this machine."""


@dataclass(frozen=True)
class TorchDevice:
    """A torch device by configuration: `device` is 'cpu', 'cuda:N' or 'mps'."""

    device: str = "cpu"
    threads: int | None = None  # CPU intra-op threads; None leaves torch's default
    dtype: str = "float32"

    def check(self) -> None:
        """Raise a clear error when this device is not present here."""
        kind = self.device.split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {self.device!r}: torch sees no CUDA GPU here; use a map with "
                "device: cpu (e.g. examples/device_maps/ort_ort_cpu.yaml)"
            )
        if kind == "mps" and not torch.backends.mps.is_available():
            raise DeviceUnavailableError(
                f"device {self.device!r}: MPS is not available here; use device: cpu"
            )
        if kind not in ("cpu", "cuda", "mps"):
            raise ValueError(f"torch device {self.device!r}: expected cpu, cuda:N or mps")

    def describe(self) -> str:
        threads = f", {self.threads} thread(s)" if self.threads else ""
        return f"torch {self.device} {self.dtype}{threads}"


class TorchRunner:
    """`SplitRunner` over a `CausalLM` and its `StaticKVCache` on one torch device.

    `set_threads(n)` makes the next forwards set torch's intra-op thread count to n first
    (torch's count is per process; the forward runs on the device's pipeline thread).
    """

    def __init__(self, model: CausalLM, device: TorchDevice, max_len: int, exit_layer: int = 0,
                 name: str = "target"):  # fmt: skip
        device.check()
        self.model = model.to(device.device)
        self.device = device
        self.cache = model.new_cache(max_len)
        self.max_len = max_len
        self.vocab_size = model.config.vocab_size
        self.exit_layer = exit_layer
        self.name = f"{name} on {device.describe()}"
        self.threads = device.threads

    @property
    def length(self) -> int:
        return self.cache.length

    def set_threads(self, threads: int | None) -> None:
        """Run the next forwards on `threads` torch intra-op threads (None: leave torch's)."""
        self.threads = threads

    def _to(self, *ts: torch.Tensor) -> list[torch.Tensor]:
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return [t.to(self.device.device) for t in ts]

    @torch.inference_mode()
    def forward(self, ids, position_ids, mask):
        ids, position_ids, mask = self._to(ids, position_ids, mask)
        return self.model(ids, position_ids, mask, self.cache)[0].float().cpu()

    @torch.inference_mode()
    def fill(self, ids, position_ids, mask) -> None:
        """All layers on new rows without the head: their K/V only (length += T)."""
        ids, position_ids, mask = self._to(ids, position_ids, mask)
        n = self.model.num_layers
        self.model.run_layers(0, n, self.model.embed(ids), position_ids, mask, self.cache)
        self.cache.advance(ids.shape[1])

    @torch.inference_mode()
    def forward_prefix(self, ids, position_ids, mask):
        ids, position_ids, mask = self._to(ids, position_ids, mask)
        return self.model.run_layers(
            0, self.exit_layer, self.model.embed(ids), position_ids, mask, self.cache
        )

    @torch.inference_mode()
    def exit_logits(self, hidden):
        (hidden,) = self._to(hidden)  # the profiler times the head on a host tensor
        return self.model.head(hidden)[0].float().cpu()

    @torch.inference_mode()
    def forward_suffix(self, hidden, position_ids, mask):
        hidden, position_ids, mask = self._to(hidden, position_ids, mask)  # a host hidden too
        x = self.model.run_layers(
            self.exit_layer, self.model.num_layers, hidden, position_ids, mask, self.cache
        )
        self.cache.advance(hidden.shape[1])
        return self.model.head(x)[0].float().cpu()

    def rollback(self, length: int) -> None:
        self.cache.rollback(length)

    def keep(self, start: int, rows: Sequence[int]) -> None:
        self.cache.keep(start, rows)
