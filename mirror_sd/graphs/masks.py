"""Attention masks for new rows over a cached prefix (pure tensor code).

Every mask is bool (B, T, S + T): row i of the T new rows may attend to column j
(S cached rows first, then the T new rows) when mask[b, i, j] is True.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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


def sliding_window(mask: torch.Tensor, window: int) -> torch.Tensor:
    """`mask` (B, T, S + T) narrowed for a sliding-window attention layer: each row keeps only
    the `window` most recent keys it sees (itself included), which is Hugging Face's rule
    `query_pos - key_pos < window` because the keys a row sees are its own history, one key per
    earlier position (a causal, batched or tree mask from this module all are). Counting from
    the mask instead of comparing positions lets one mask serve every layer type: a sliding
    layer narrows it itself, in torch and in an exported graph alike (a CumSum, no control flow).

    `mask` is bool (True = attend) or additive (0 = attend, the dtype's min = masked); the
    result has the same form.
    """
    visible = mask if mask.dtype == torch.bool else mask == 0
    seen = visible.to(torch.int32).cumsum(-1)  # (B, T, S + T) visible keys in columns <= j
    newer = seen[..., -1:] - seen  # visible keys after column j
    keep = visible & (newer < window)
    if mask.dtype == torch.bool:
        return keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)
