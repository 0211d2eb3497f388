"""Static, preallocated KV cache with O(1) rollback.

Layout per layer: K and V of shape (B, max_len, n_kv, hd). Rows [0, length) are
valid; a forward writes its new rows at [length, length + T) and `advance(T)`
makes them valid. Rollback to any shorter length moves the pointer only;
`keep(rows)` compacts chosen speculative rows (a winning branch) into place.
The leading-dimension layout means rows [0, n) of a layer are one contiguous
block when B == 1, so a view can be handed to ONNX Runtime without a copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class CacheFullError(RuntimeError):
    """More rows were written than the cache was preallocated for."""


class StaticKVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, max_len, nkv, hd)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the valid rows of one layer: (B, length, nkv, hd) each."""
        return self.k[layer, :, : self.length], self.v[layer, :, : self.length]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new rows (B, T, nkv, hd) of one layer at [length, length + T)."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise CacheFullError(
                f"KV cache holds {self.max_len} rows; writing {k.shape[1]} rows at {self.length} "
                "would overflow it: raise max_len (the context length) when loading the model"
            )
        self.k[layer, :, self.length : end] = k
        self.v[layer, :, self.length : end] = v

    def advance(self, n: int) -> None:
        """Make the n rows written at [length, length + n) valid."""
        if self.length + n > self.max_len:
            raise CacheFullError(f"cannot advance {n} rows past max_len {self.max_len}")
        self.length += n

    def rollback(self, length: int) -> None:
        """Forget every row from `length` on (O(1): moves the pointer)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"rollback to {length} outside [0, {self.length}]")
        self.length = length

    def keep(self, start: int, rows: Sequence[int]) -> None:
        """Keep rows[i] at position start + i (compaction of a branch); length = start + len(rows).

        rows must be >= start and increasing, so each copy reads a row not yet overwritten.
        """
        rows = list(rows)
        if any(r < start or r >= self.length for r in rows) or rows != sorted(set(rows)):
            raise ValueError(f"rows {rows} must be increasing and within [{start}, {self.length})")
        if rows != list(range(start, start + len(rows))):
            src = torch.tensor(rows, device=self.k.device)
            dst = slice(start, start + len(rows))
            self.k[:, :, dst] = self.k[:, :, src]
            self.v[:, :, dst] = self.v[:, :, src]
        self.length = start + len(rows)
