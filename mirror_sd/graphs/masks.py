"""Attention masks for new rows over a cached prefix (pure tensor code).

Every mask is bool (B, T, S + T): row i of the T new rows may attend to column j
(S cached rows first, then the T new rows) when mask[b, i, j] is True.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

KEY_PAD = 32  # a group's keys come padded to a multiple of this many (row invariance, below)


def causal_mask(past_len: int, new: int, batch: int = 1) -> torch.Tensor:
    """New rows see the whole prefix and the new rows up to and including themselves."""
    cols = torch.arange(past_len + new)
    rows = torch.arange(new)[:, None] + past_len
    return (cols[None, :] <= rows).expand(batch, new, past_len + new).contiguous()


def tree_mask(
    past_len: int, parents: Sequence[int], visible_past: int | None = None
) -> torch.Tensor:
    """Mask (1, T, S + T) for T new rows forming a forest: parents[i] is the index of row i's
    parent among the new rows (-1 for a root). Each row sees cache rows [0, visible_past)
    (default: all S), its ancestors and itself."""
    t = len(parents)
    visible_past = past_len if visible_past is None else visible_past
    mask = torch.zeros(1, t, past_len + t, dtype=torch.bool)
    mask[0, :, :visible_past] = True
    for i, p in enumerate(parents):
        if p >= i:
            raise ValueError(f"parents[{i}] = {p}: a parent must come before its child")
        mask[0, i, past_len + i] = True
        if p >= 0:
            mask[0, i, : past_len + t] |= mask[0, p, : past_len + t]
    return mask


def sliding_window(mask: torch.Tensor | Grouped, window: int) -> torch.Tensor | Grouped:
    """`mask` (B, T, S + T) narrowed for a sliding-window attention layer: each row keeps only
    the `window` most recent keys it sees (itself included), which is Hugging Face's rule
    `query_pos - key_pos < window` because the keys a row sees are its own history, one key per
    earlier position (a causal, batched or tree mask from this module all are). Counting from
    the mask instead of comparing positions lets one mask serve every layer type: a sliding
    layer narrows it itself, in torch and in an exported graph alike (a CumSum, no control flow).

    `mask` is bool (True = attend) or additive (0 = attend, the dtype's min = masked); the
    result has the same form. A `Grouped` mask is narrowed the same way (its keys are each
    row's history in order too).
    """
    if isinstance(mask, Grouped):
        return mask._replace(mask=sliding_window(mask.mask, window))
    visible = mask if mask.dtype == torch.bool else mask == 0
    seen = visible.to(torch.int32).cumsum(-1)  # (B, T, S + T) visible keys in columns <= j
    newer = seen[..., -1:] - seen  # visible keys after column j
    keep = visible & (newer < window)
    if mask.dtype == torch.bool:
        return keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)


class Grouped(NamedTuple):
    """A packed block's attention, regrouped so that every row's visible keys are a contiguous
    prefix, as when the row's sequence decodes alone (docs/runtime.md, *Row invariance*).

    The T block rows fall into G groups (a sequence's chain, or one root-to-leaf path of a
    token tree); group g reads the L keys `key_index[g]` of the block's S + T (cached columns,
    then new rows), visible ones first and in order. Its rows `row_index[g]` (R slots, padded
    by repeating a row) attend under `mask[g]` (R, L), each a prefix; `row_slot[t]` is block
    row t's slot in the flattened (G * R) grid. One lone sequence with contiguous columns is
    one group reading every column, the exact layout an ungrouped graph computes."""

    mask: torch.Tensor  # (G, R, L) bool, or additive inside a graph
    key_index: torch.Tensor  # (G, L) int64
    row_index: torch.Tensor  # (G, R) int64
    row_slot: torch.Tensor  # (T,) int64


def group_rows(mask: torch.Tensor) -> Grouped:
    """Regroup a block's mask (1, T, S + T) bool, as `PackedCache` and the runners build it,
    into `Grouped` (each row's visible keys one prefix of its group's keys).

    Each group's key list is padded with masked keys (index 0) to a multiple of KEY_PAD:
    ONNX Runtime's GEMM sums a reduction's tail by its length, and past a multiple of KEY_PAD
    extra zero-weight keys change no bit (measured for every length up to 530), so rows that
    see different numbers of keys still round alike.

    Raises:
        ValueError: the mask is not (1, T, S + T), or a row sees none of the columns.
    """
    if mask.dim() != 3 or mask.shape[0] != 1 or mask.shape[2] < mask.shape[1]:
        raise ValueError(f"mask of shape {tuple(mask.shape)}: expected (1, T, S + T)")
    m = mask[0].to(torch.bool)
    t, c = m.shape
    lengths = m.sum(-1)
    if not bool(lengths.all()):
        raise ValueError("a row of the mask sees no key: every row must see at least itself")
    if torch.equal(m, torch.arange(c) < lengths[:, None]):  # one contiguous sequence
        width = -(-c // KEY_PAD) * KEY_PAD
        rows = torch.arange(t)
        keys = torch.zeros(width, dtype=torch.long)
        keys[:c] = torch.arange(c)
        grid = torch.zeros(1, t, width, dtype=torch.bool)
        grid[0, :, :c] = m
        return Grouped(grid, keys[None], rows[None], rows)
    groups: list[tuple[list[int], list[int]]] = []  # (key columns, rows)
    keys_of = [row.nonzero().flatten().tolist() for row in m]
    for r, keys in enumerate(keys_of):
        for g_keys, g_rows in groups:
            n = min(len(keys), len(g_keys))
            if keys[:n] == g_keys[:n]:  # one is a prefix of the other: same chain
                g_keys.extend(keys[n:])
                g_rows.append(r)
                break
        else:
            groups.append((list(keys), [r]))
    width = -(-max(len(k) for k, _ in groups) // KEY_PAD) * KEY_PAD
    depth = max(len(r) for _, r in groups)
    key_index = torch.zeros(len(groups), width, dtype=torch.long)
    row_index = torch.zeros(len(groups), depth, dtype=torch.long)
    grid = torch.zeros(len(groups), depth, width, dtype=torch.bool)
    row_slot = torch.zeros(t, dtype=torch.long)
    for g, (keys, rows) in enumerate(groups):
        key_index[g, : len(keys)] = torch.tensor(keys)
        for j in range(depth):
            r = rows[min(j, len(rows) - 1)]  # padding slots repeat the group's last row
            row_index[g, j] = r
            grid[g, j, : len(keys_of[r])] = True
        row_slot[rows] = g * depth + torch.arange(len(rows))
    return Grouped(grid, key_index, row_index, row_slot)
