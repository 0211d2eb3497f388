"""Gemma 3 (text) as a stage-addressable `CausalLM`: the module tree of `model_type` gemma3_text.

Same stage interface and Hugging Face module names as `model.py` (so checkpoints load as
they are); what differs from Llama, each in its own module below:

- RMSNorm scales by (1 + weight), computed in fp32 (`Gemma3RMSNorm`); q and k get one each;
- four norms per layer: input, post-attention, pre- and post-feed-forward;
- the embedding is multiplied by sqrt(hidden_size) (`ScaledEmbedding`, inside the module, so
  every caller of `embed_tokens` gets it);
- attention scores scale by query_pre_attn_scalar ** -0.5. `attn_logit_softcapping` is
  not applied: transformers' Gemma3Attention reads it but never passes it on (Gemma 3
  replaced Gemma 2's soft-capping by the q/k norms), and its output is the reference;
- the MLP's activation is GELU (tanh approximation);
- layers are `sliding_attention` or `full_attention` (`layer_types`, or every
  `sliding_window_pattern`-th layer full). Sliding layers see only the `sliding_window`
  most recent keys (`masks.sliding_window`, derived from the one mask every layer takes) and
  use their own RoPE table (`rope_local_base_freq`). `rope()` therefore returns cos / sin of
  shape (B, T, 2, hd): table 0 for full layers, table 1 for sliding ones;
- final logits are soft-capped when the config sets `final_logit_softcapping`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mirror_sd.graphs.config import ModelConfig, UnsupportedModelError
from mirror_sd.graphs.masks import sliding_window
from mirror_sd.graphs.model import MLP, CausalLM, attend, rotate_half

LAYER_TYPES = ("full_attention", "sliding_attention")  # index = the layer's RoPE table
ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}  # F.gelu's `approximate`


def rope_table(cfg: ModelConfig, layer_type: str) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (hd/2,) on the CPU and cos/sin scale of one layer type's RoPE."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = cfg.hf_config
    params = hf.rope_parameters[layer_type]
    if params.get("rope_type", "default") == "default":
        dims = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device="cpu") / cfg.head_dim
        return 1.0 / (params["rope_theta"] ** dims), 1.0
    inv_freq, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu", layer_type=layer_type)
    return inv_freq.float().cpu(), float(scale)


class Gemma3RMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), in fp32, cast back (Hugging Face's Gemma3RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class ScaledEmbedding(nn.Embedding):
    """An embedding whose rows are multiplied by `scale` (rounded to fp32, then to the
    weights' dtype, as Hugging Face does)."""

    def __init__(self, num: int, dim: int, scale: float):
        super().__init__(num, dim)
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        scale = torch.tensor(self.scale, dtype=torch.float32, device=w.device).to(w.dtype)
        return super().forward(ids) * scale  # (B, T, D)


class Gemma3MLP(MLP):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.approximate = ACTIVATIONS[cfg.hf_config.hidden_activation]

    def forward(self, x):
        gate = F.gelu(self.gate_proj(x), approximate=self.approximate)
        return self.down_proj(gate * self.up_proj(x))


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str):
        super().__init__()
        hf, hd, nh, nkv = cfg.hf_config, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.n_heads, self.n_kv, self.head_dim = nh, nkv, hd
        self.q_proj = nn.Linear(cfg.hidden_size, nh * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nh * hd, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = Gemma3RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(hd, cfg.rms_norm_eps)
        self.rope_index = LAYER_TYPES.index(layer_type)
        self.window = hf.sliding_window if layer_type == "sliding_attention" else None
        self.scale = hf.query_pre_attn_scalar**-0.5

    def forward(self, x, cos, sin, mask, past_k, past_v):
        """x (B, T, D); cos/sin (B, T, 2, hd); mask (B, T, S+T); past (B, S, nkv, hd)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim))  # (B,T,nh,hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim))  # (B,T,nkv,hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        cos = cos[:, :, self.rope_index].unsqueeze(2)  # (B, T, 1, hd)
        sin = sin[:, :, self.rope_index].unsqueeze(2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys = torch.cat([past_k, k], dim=1).transpose(1, 2)  # (B, nkv, S+T, hd)
        values = torch.cat([past_v, v], dim=1).transpose(1, 2)
        if self.window is not None:
            mask = sliding_window(mask, self.window)
        out = attend(q, keys, values, mask, self.scale)  # (B, T, nh, hd)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim)), k, v


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Gemma3Attention(cfg, layer_type)
        self.mlp = Gemma3MLP(cfg)
        self.input_layernorm = Gemma3RMSNorm(d, eps)
        self.post_attention_layernorm = Gemma3RMSNorm(d, eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(d, eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(d, eps)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        """x (B, T, D); cos/sin (B, T, 2, hd); mask (B, T, S+T); past (B, S, nkv, hd)."""
        h, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + self.post_attention_layernorm(h)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, k, v  # (B, T, D), (B, T, nkv, hd) x2


class Gemma3Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, d, math.sqrt(d))
        types = cfg.hf_config.layer_types
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, types[i]) for i in range(len(types)))
        self.norm = Gemma3RMSNorm(d, cfg.rms_norm_eps)


class Gemma3CausalLM(CausalLM):
    """Gemma 3 (text) with `CausalLM`'s stages; see the module docstring for the differences.

    Raises:
        UnsupportedModelError: a layer type other than sliding / full attention, or an
            activation other than GELU.
    """

    def __init__(self, cfg: ModelConfig):
        hf = cfg.hf_config
        unknown = sorted(set(hf.layer_types) - set(LAYER_TYPES))
        if unknown or len(hf.layer_types) != cfg.num_layers:
            raise UnsupportedModelError(
                f"gemma3_text layer_types {unknown or hf.layer_types} not supported: expected "
                f"{cfg.num_layers} entries of {', '.join(LAYER_TYPES)}"
            )
        if hf.hidden_activation not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"hidden_activation {hf.hidden_activation!r} not supported; supported: "
                f"{', '.join(ACTIVATIONS)}"
            )
        super().__init__(cfg)  # Llama's tree first (free on the meta device), then Gemma's
        self.model = Gemma3Backbone(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        tables = [rope_table(cfg, t) for t in LAYER_TYPES]
        # real tensors even under torch.device("meta"): the loader assigns weights only
        self.register_buffer("inv_freq", torch.stack([f for f, _ in tables]), persistent=False)
        self.rope_scales = tuple(s for _, s in tables)
        self.final_softcap = hf.final_logit_softcapping

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(B, T) int64 -> cos, sin (B, T, 2, hd): RoPE table 0 (full layers), 1 (sliding)."""
        freqs = position_ids[..., None, None].float() * self.inv_freq  # (B, T, 2, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, 2, hd)
        cos, sin = emb.cos(), emb.sin()
        # x * 1.0 == x, and with a Mul here torch's exporter names its output like the Cos
        # node it reads ("Duplicate definition of name (cos)" once layered assembles a range)
        if self.rope_scales != (1.0, 1.0):
            scale = torch.tensor(self.rope_scales, device=emb.device)[:, None]  # (2, 1)
            cos, sin = cos * scale, sin * scale
        return cos.to(dtype), sin.to(dtype)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ soft-capping when configured): (B, T, D) -> (B, T, V)."""
        logits = super().head(x)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
