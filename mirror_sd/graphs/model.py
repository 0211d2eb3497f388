"""A compact, stage-addressable decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3).

Module names mirror Hugging Face's (`model.layers.3.self_attn.q_proj`, ...), so a
checkpoint's state dict loads as it is. Every stage is a pure function of tensors:

    embed(ids)                                  (B, T) -> (B, T, D)
    layer(x, cos, sin, mask, past_k, past_v)    -> x', new_k, new_v
    head(x)                                     (B, T, D) -> (B, T, V)  final norm + LM head

A layer attends to `past` rows (B, S, n_kv, hd) and its own T new rows under an
explicit boolean mask (B, T, S + T) — causal, or a tree mask over branch rows —
and returns its new K/V rows instead of writing them, so the same code exports to
ONNX (no in-graph cache writes, no data-dependent Python control flow).
`run_layers(a, b, ...)` runs layers [a, b) against a `StaticKVCache`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mirror_sd.graphs.config import ModelConfig, UnsupportedModelError
from mirror_sd.graphs.kv_cache import StaticKVCache
from mirror_sd.graphs.masks import Grouped


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.n_heads, self.n_kv, self.head_dim = nh, nkv, hd
        self.q_proj = nn.Linear(cfg.hidden_size, nh * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nh * hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, past_k, past_v):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)  # (B, T, nkv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys = torch.cat([past_k, k], dim=1).transpose(1, 2)  # (B, nkv, S+T, hd)
        values = torch.cat([past_v, v], dim=1).transpose(1, 2)
        out = attend(q, keys, values, mask, self.head_dim**-0.5)  # (B, T, nh, hd)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim)), k, v


ROW_INVARIANT_ROWS = 64  # blocks of up to this many rows attend one query row at a time


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | Grouped,
    scale: float,
) -> torch.Tensor:  # fmt: skip
    """Grouped-query attention: q (B, T, nh, hd), keys / values (B, nkv, S, hd), mask
    (B, T, S) bool (True = attend) or additive float -> (B, T, nh, hd).

    Exported graphs pass a `Grouped` mask (B = 1, a packed block; `masks.group_rows`): each
    group's keys are gathered into a contiguous prefix and its rows attend group by group,
    every row as its own one-row product (`_attend_grouped`), so a row's result is bit for
    bit the same alone (one decoding step), in a verification block, in a packed batch or on a
    tree's path (docs/runtime.md, *Row invariance*).

    In eager torch on the CPU, a short block whose rows each see a prefix of the keys (a
    verification chain, a decoding step) computes each row alone (`_prefix_lengths`); other
    eager calls use `scaled_dot_product_attention`.
    """
    if isinstance(mask, Grouped):
        return _attend_grouped(q, keys, values, mask, scale)
    B, T, nh, hd = q.shape
    nkv = keys.shape[1]
    q = q.view(B, T, nkv, nh // nkv, hd).permute(0, 2, 3, 1, 4)  # (B, nkv, G, T, hd)
    lengths = None if torch.compiler.is_exporting() else _prefix_lengths(q, mask)
    if lengths is not None:  # eager, CPU: each row alone over exactly the keys it sees
        rows = []
        for j, n in enumerate(lengths):
            k, v = keys[:, :, :n], values[:, :, :n]  # (1, nkv, n, hd)
            scores = (q[:, :, :, j] @ k.transpose(-1, -2)).float() * scale  # (1, nkv, G, n)
            rows.append(torch.softmax(scores, dim=-1).to(v.dtype) @ v)  # (1, nkv, G, hd)
        return torch.stack(rows, dim=1).reshape(B, T, nh, hd)  # (B, T, nh, hd)
    keys, values = keys[:, :, None], values[:, :, None]  # (B, nkv, 1, S, hd)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~mask, torch.finfo(q.dtype).min
        )
    bias = mask[:, None, None]  # (B, 1, 1, T, S)
    G = nh // nkv
    out = F.scaled_dot_product_attention(
        q, keys.expand(-1, -1, G, -1, -1), values.expand(-1, -1, G, -1, -1),
        attn_mask=bias, scale=scale,
    )  # fmt: skip
    return out.permute(0, 3, 1, 2, 4).reshape(B, T, nh, hd)  # (B, T, nh, hd)


def _attend_grouped(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, g: Grouped, scale: float
) -> torch.Tensor:
    """`attend` on a packed block (B = 1) group by group (see `masks.Grouped`). One gather
    copies each group's keys and values into a prefix (nkv, G, L, hd), with no transpose after
    it; `group_rows` pads L to a multiple of KEY_PAD with masked keys, so the zero padding the
    ungrouped path adds is not needed. A block of at most ROW_INVARIANT_ROWS rows per group
    computes every row as its own one-row products, as `attend` does."""
    _, T, nh, hd = q.shape
    nkv = keys.shape[1]
    G, R = g.row_index.shape
    grid = q[0][g.row_index].view(G, R, nkv, nh // nkv, hd).permute(2, 0, 3, 1, 4)
    k = keys[0][:, g.key_index][:, :, None]  # (nkv, G, 1, L, hd)
    v = values[0][:, g.key_index][:, :, None]
    mask = g.mask
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~mask, torch.finfo(q.dtype).min
        )
    bias = mask[None, :, None]  # (1, G, 1, R, L)

    def rowwise(grid, k, v, bias):  # one (1 x hd) @ (hd x L) product per query row
        scores = grid.unsqueeze(-2) @ k.transpose(-1, -2).unsqueeze(-3)  # (nkv,G,G_,R,1,L)
        p = torch.softmax(scores.squeeze(-2) * scale + bias, dim=-1)  # (nkv, G, G_, R, L)
        return (p.unsqueeze(-2) @ v.unsqueeze(-3)).squeeze(-2)  # (nkv, G, G_, R, hd)

    def blocked(grid, k, v, bias):  # ordinary GEMMs over a group's rows (a prefill)
        return torch.softmax((grid @ k.transpose(-1, -2)) * scale + bias, dim=-1) @ v

    operands = (grid, k, v, bias)
    if torch.compiler.is_exporting():
        out = torch.cond(R <= ROW_INVARIANT_ROWS, rowwise, blocked, operands)
    else:
        out = rowwise(*operands) if R <= ROW_INVARIANT_ROWS else blocked(*operands)
    out = out.permute(1, 3, 0, 2, 4).reshape(G * R, nh, hd)  # (G * R, nh, hd)
    return out[g.row_slot][None]  # (1, T, nh, hd)


def _prefix_lengths(q: torch.Tensor, mask: torch.Tensor) -> list[int] | None:
    """Per row, how many leading keys it sees, when every row of a short CPU block sees
    exactly a prefix of the keys (a causal chain, a decoding step); else None.

    Then `attend` computes each row alone over exactly its visible keys, the very operations
    decoding that row alone performs: bit-for-bit row invariance in eager torch, whatever the
    kernels do with shapes (a tree block or a packed batch takes the masked path instead)."""
    if q.device.type != "cpu" or mask.dtype != torch.bool or mask.shape[0] != 1:
        return None
    if mask.shape[1] > ROW_INVARIANT_ROWS:
        return None
    m = mask[0]  # (T, S)
    lengths = m.sum(-1)  # (T,)
    if not torch.equal(m, torch.arange(m.shape[-1]) < lengths[:, None]):
        return None
    return lengths.tolist()


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        """x (B, T, D); cos/sin (B, T, hd); mask (B, T, S+T) bool; past (B, S, nkv, hd)."""
        h, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v  # (B, T, D), (B, T, nkv, hd) x2


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The whole model, runnable stage by stage. Weights load from HF state dicts as-is."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, scale = cfg.rope_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scale = scale

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    # --- stages -----------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 -> (B, T, D)."""
        return self.model.embed_tokens(ids)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(B, T) int64 -> cos, sin (B, T, hd), computed in fp32 then cast like HF does."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: (B, T, D) -> (B, T, V) logits."""
        return self.lm_head(self.model.norm(x))

    def run_layers(
        self,
        a: int,
        b: int,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        cache: StaticKVCache,
    ) -> torch.Tensor:
        """Run decoder layers [a, b) on new rows x (B, T, D).

        The rows attend to the cache's first `cache.length` rows and to each other under
        `mask` (B, T, cache.length + T) bool (True = attend). Their K/V are written into
        the cache at [cache.length, cache.length + T) for these layers; the caller calls
        `cache.advance(T)` once every layer has run.
        """
        if not 0 <= a <= b <= self.num_layers:
            raise IndexError(f"layer range [{a}, {b}) outside [0, {self.num_layers}]")
        cos, sin = self.rope(position_ids, x.dtype)
        for i in range(a, b):
            past_k, past_v = cache.past(i)
            x, k, v = self.model.layers[i](x, cos, sin, mask, past_k, past_v)
            cache.write(i, k, v)
        return x

    def forward(
        self,
        ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        cache: StaticKVCache,
    ) -> torch.Tensor:
        """All stages on new tokens ids (B, T); appends their K/V rows; returns logits (B, T, V)."""
        x = self.run_layers(0, self.num_layers, self.embed(ids), position_ids, mask, cache)
        cache.advance(ids.shape[1])
        return self.head(x)

    def new_cache(self, max_len: int, batch: int = 1) -> StaticKVCache:
        """A preallocated cache for this model (same dtype and device as its weights).

        Raises:
            UnsupportedModelError: max_len exceeds the model's sliding attention window
                (attention over a window is exact only while the context fits in it).
        """
        c = self.config
        if c.sliding_window is not None and max_len > c.sliding_window:
            raise UnsupportedModelError(
                f"max_len {max_len} exceeds the sliding attention window of {c.sliding_window} "
                "tokens, which this runtime does not implement; use max_len <= "
                f"{c.sliding_window}"
            )
        w = self.model.embed_tokens.weight  # the cache lives where the weights do (cuda:N)
        return StaticKVCache(c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, w.dtype,
                             w.device)  # fmt: skip
