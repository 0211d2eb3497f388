"""Architecture description of a supported causal LM, read from a Hugging Face config.

`ModelConfig` is the one place where family differences (Llama, Mistral, Qwen2,
Qwen3) are turned into plain switches (`attention_bias`, `qk_norm`, ...) so that
`model.py` has no per-family branches. Families with a module tree of their own (Gemma 3,
Phi-3; `families.FAMILIES`) read the rest of their settings from `hf_config` in their module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mirror_sd.graphs.families import FAMILIES, REFUSED, SUPPORTED_ARCHITECTURES

# RoPE variants whose frequencies are fixed at load time (no dependence on sequence length).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


class UnsupportedModelError(ValueError):
    """The model folder holds an architecture or setting this runtime cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one decoder-only model (what `model.py` needs, nothing more)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    sliding_window: int | None  # attention window; contexts up to this length are exact
    hf_config: PretrainedConfig

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token adds to the cache across all layers, in fp32."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse RoPE frequencies (head_dim/2,) and the cos/sin scaling factor."""
        params = getattr(self.hf_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params.get("rope_theta", 10000.0)
            dims = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
            return 1.0 / (base**dims), 1.0
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, "cpu")
        return inv_freq.float(), float(scale)


def from_hf_config(hf: PretrainedConfig) -> ModelConfig:
    """Validate a transformers config and turn it into a `ModelConfig`.

    Raises:
        UnsupportedModelError: unknown `model_type` or a dynamic RoPE variant.
    """
    model_type = getattr(hf, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        why = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported{why}; supported architectures: "
            f"{supported} (Llama covers SmolLM2, Qwen2 covers Qwen2.5)"
        )
    family = FAMILIES[model_type]
    for rope_type in _rope_types(hf, family.modules):
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type {rope_type!r} is not supported; supported: "
                f"{', '.join(STATIC_ROPE_TYPES)}"
            )
    if getattr(hf, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            f"{model_type} with use_bidirectional_attention (an embedding model) is not a "
            "causal LM; speculative decoding needs causal attention"
        )
    uses_window = getattr(hf, "use_sliding_window", model_type == "mistral")
    if family.modules != "llama":  # their module trees implement the window per layer
        uses_window = False
    window = getattr(hf, "sliding_window", None) if uses_window else None
    bias, qk_norm = family.attention_bias, family.qk_norm
    num_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=hf.rms_norm_eps,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(hf, "attention_bias", bias)),
        qk_norm=qk_norm,
        max_position_embeddings=hf.max_position_embeddings,
        sliding_window=window,
        hf_config=hf,
    )


def _rope_types(hf: PretrainedConfig, modules: str) -> list[str]:
    """The rope_type of every RoPE table the model uses (Gemma 3: one per layer type)."""
    params = getattr(hf, "rope_parameters", None) or {}
    if modules == "gemma3":
        return [(params.get(t) or {}).get("rope_type", "default") for t in set(hf.layer_types)]
    return [params.get("rope_type", "default")]


def load_config(folder: str | Path) -> ModelConfig:
    """Read `folder/config.json` (a local Hugging Face model folder) into a `ModelConfig`."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; expected a Hugging Face model folder"
        )
    return from_hf_config(AutoConfig.from_pretrained(folder))
