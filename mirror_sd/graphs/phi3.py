"""Phi-3 as a stage-addressable `CausalLM`: the module tree of `model_type` phi3.

Phi-3 is Llama's layer with three differences:

- fused projections: `qkv_proj` (q, k and v rows stacked) and `gate_up_proj` (gate rows,
  then up rows). `unfuse` splits them when the checkpoint is read, into Llama's `q_proj`,
  `k_proj`, `v_proj`, `gate_proj` and `up_proj`: the same products, and every consumer that
  knows Llama's linears (tensor-parallel sharding, weight quantization, exit heads) works
  unchanged;
- partial rotary embeddings (`partial_rotary_factor` < 1: only the first dims of each head
  rotate; Phi-4-mini);
- an optional `sliding_window` on every layer (`masks.sliding_window`), and LongRoPE
  (`rope_type` longrope, formerly "su"): Hugging Face switches from the short to the long
  factors once a sequence passes `original_max_position_embeddings`, so the frequencies
  here (the short factors) are exact up to that length and `new_cache` refuses longer.
"""

from __future__ import annotations

import torch

from mirror_sd.graphs.config import ModelConfig, UnsupportedModelError
from mirror_sd.graphs.kv_cache import StaticKVCache
from mirror_sd.graphs.masks import sliding_window
from mirror_sd.graphs.model import Attention, CausalLM, attend, rotate_half


def unfuse(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Phi-3 state dict with `qkv_proj` / `gate_up_proj` weights split into Llama's names
    (views, no copy); a state dict already split passes through unchanged."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            prefix = name[: -len("qkv_proj.weight")]
            for part, w in zip(("q", "k", "v"), t.split([q, kv, kv]), strict=True):
                out[f"{prefix}{part}_proj.weight"] = w  # (rows, D)
        elif name.endswith("mlp.gate_up_proj.weight"):
            prefix = name[: -len("gate_up_proj.weight")]
            out[f"{prefix}gate_proj.weight"], out[f"{prefix}up_proj.weight"] = t.chunk(2)
        else:
            out[name] = t
    return out


def rotary_dim(cfg: ModelConfig) -> int:
    """How many leading dims of each head rotate (head_dim times partial_rotary_factor)."""
    params = getattr(cfg.hf_config, "rope_parameters", None) or {}
    return int(cfg.head_dim * params.get("partial_rotary_factor", 1.0))


class Phi3Attention(Attention):
    """Llama's attention with partial rotary embeddings and an optional sliding window."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.rotary_dim = rotary_dim(cfg)
        self.window = getattr(cfg.hf_config, "sliding_window", None)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        """x (B, T, D); cos/sin (B, T, rotary_dim); mask (B, T, S+T); past (B, S, nkv, hd)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)  # (B, T, nkv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        keys = torch.cat([past_k, k], dim=1).transpose(1, 2)  # (B, nkv, S+T, hd)
        values = torch.cat([past_v, v], dim=1).transpose(1, 2)
        if self.window is not None:
            mask = sliding_window(mask, self.window)
        out = attend(q, keys, values, mask, self.head_dim**-0.5)  # (B, T, nh, hd)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim)), k, v

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the first rotary_dim dims of x (B, T, n, hd); the rest pass through."""
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, rotary_dim)
        if self.rotary_dim == self.head_dim:
            return x * cos + rotate_half(x) * sin
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)


class Phi3CausalLM(CausalLM):
    """Phi-3 with `CausalLM`'s stages and Llama's module names (see `unfuse`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        for layer in self.model.layers:
            layer.self_attn = Phi3Attention(cfg)
        inv_freq, scale = rope_inv_freq(cfg)
        # real tensors even under torch.device("meta"): the loader assigns weights only
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scale = scale

    def new_cache(self, max_len: int, batch: int = 1) -> StaticKVCache:
        """As `CausalLM.new_cache`; with LongRoPE at most `original_max_position_embeddings`.

        Raises:
            UnsupportedModelError: max_len needs LongRoPE's long factors.
        """
        hf = self.config.hf_config
        params = getattr(hf, "rope_parameters", None) or {}
        limit = params.get("original_max_position_embeddings") or getattr(
            hf, "original_max_position_embeddings", None
        )
        if params.get("rope_type") == "longrope" and limit and max_len > limit:
            raise UnsupportedModelError(
                f"max_len {max_len} exceeds original_max_position_embeddings ({limit}), past "
                "which LongRoPE switches to its long factors for the whole sequence, which "
                f"this runtime does not implement; use max_len <= {limit}"
            )
        return super().new_cache(max_len, batch)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rotary_dim/2,) on the CPU and the cos/sin scale (LongRoPE: the
    short factors and its attention factor)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = cfg.hf_config
    params = getattr(hf, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = rotary_dim(cfg)
        dims = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
        return 1.0 / (params.get("rope_theta", 10000.0) ** dims), 1.0
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    return inv_freq.float().cpu(), float(scale)
