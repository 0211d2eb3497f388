"""Megatron-style tensor parallelism for a `CausalLM`, in place.

Rank r of W keeps, in every decoder layer:
- attention: query heads [r·H/W, (r+1)·H/W) and KV heads [r·K/W, (r+1)·K/W) of q/k/v_proj
  (column-parallel: output rows sliced, bias too), and the matching input columns of o_proj
  (row-parallel), whose partial output is summed over ranks by an all-reduce;
- MLP: rows [r·I/W, (r+1)·I/W) of gate_proj and up_proj (column-parallel) and the matching
  columns of down_proj (row-parallel, all-reduce).
Embedding, final norm and LM head stay whole on every rank (each rank ends with the full
hidden state and the full logits). Contiguous head slices keep grouped-query attention's
groups on one rank (query head h reads KV head h // (H/K)).

The all-reduce sums W partial products: the same numbers in a different summation order from
one device's matmul, so logits can differ from the single-process model in the last bits. The
TP target is the plan's reference (as a quantized target is): lossless means identical to the
TP target's own greedy decoding.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from mirror_sd.graphs.model import CausalLM


class RowParallelLinear(nn.Module):
    """A bias-free Linear over this rank's input columns, its output summed over the group."""

    def __init__(self, full: nn.Linear, cols: slice, group=None):
        super().__init__()
        if full.bias is not None:
            raise ValueError("a row-parallel projection must have no bias")
        self.weight = nn.Parameter(full.weight.data[:, cols].clone(), requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y


def _columns(full: nn.Linear, rows: slice) -> nn.Linear:
    """This rank's output rows of a column-parallel Linear (with their bias)."""
    out = nn.Linear(full.in_features, rows.stop - rows.start, bias=full.bias is not None)
    out = out.to(full.weight.dtype).to(full.weight.device)
    out.weight.data = full.weight.data[rows].clone()
    if full.bias is not None:
        out.bias.data = full.bias.data[rows].clone()
    return out.requires_grad_(False)


def check_divisible(num_heads: int, num_kv_heads: int, intermediate: int, world: int) -> str | None:
    """Why `world` ranks cannot split this model, or None when they can."""
    for what, n in (("attention heads", num_heads), ("key/value heads", num_kv_heads),
                    ("MLP intermediate size", intermediate)):  # fmt: skip
        if n % world:
            return f"the model's {n} {what} do not divide over {world} ranks"
    return None


def shard_(model: CausalLM, rank: int, world: int, group=None) -> CausalLM:
    """Keep rank `rank`'s shard of every decoder layer of `model` (in place); returns it.

    Raises:
        ValueError: heads, KV heads or the MLP width do not divide by `world`.
    """
    cfg = model.config
    why = check_divisible(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, world)
    if why:
        raise ValueError(why)
    nh, nkv, hd, inter = (cfg.num_heads // world, cfg.num_kv_heads // world, cfg.head_dim,
                          cfg.intermediate_size // world)  # fmt: skip
    q = slice(rank * nh * hd, (rank + 1) * nh * hd)
    kv = slice(rank * nkv * hd, (rank + 1) * nkv * hd)
    mlp = slice(rank * inter, (rank + 1) * inter)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        a.q_proj, a.k_proj, a.v_proj = (
            _columns(a.q_proj, q),
            _columns(a.k_proj, kv),
            _columns(a.v_proj, kv),
        )
        a.o_proj = RowParallelLinear(a.o_proj, q, group)
        a.n_heads, a.n_kv = nh, nkv
        m.gate_proj, m.up_proj = _columns(m.gate_proj, mlp), _columns(m.up_proj, mlp)
        m.down_proj = RowParallelLinear(m.down_proj, mlp, group)
    # the cache holds this rank's KV heads only
    model.config = replace(cfg, num_heads=nh, num_kv_heads=nkv, intermediate_size=inter)
    return model
