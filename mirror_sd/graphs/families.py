"""The one registry of supported model families (no torch import: `zoo` and the CLI read it).

Each entry says which `config.json` `model_type` it covers, which module tree runs it and
the family switches `config.from_hf_config` turns into `ModelConfig` fields. Everything
that lists architectures (error messages, the zoo, docs/models.md's table, the tests'
parametrization) derives from `FAMILIES`. Adding a family: docs/models.md, *Adding a family*.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Family:
    """One supported architecture.

    Attributes:
        model_type: `config.json`'s `model_type`.
        name: the family's human name.
        examples: models it covers.
        modules: which module tree runs it: "llama" (`model.CausalLM`), "gemma3"
            (`gemma.Gemma3CausalLM`) or "phi3" (`phi3.Phi3CausalLM`).
        attention_bias: q/k/v projections have a bias (unless the config says otherwise).
        qk_norm: per-head RMSNorm on q and k.
        layer_norms: hidden-size norms per decoder layer (Gemma 3: four).
    """

    model_type: str
    name: str
    examples: str
    modules: str = "llama"
    attention_bias: bool = False
    qk_norm: bool = False
    layer_norms: int = 2


FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        f.model_type: f
        for f in (
            Family("llama", "Llama", "Llama 2/3, SmolLM2, TinyLlama"),
            Family("mistral", "Mistral", "Mistral 7B (contexts up to its sliding window)"),
            Family("qwen2", "Qwen2", "Qwen2, Qwen2.5, Qwen2.5-Coder", attention_bias=True),
            Family("qwen3", "Qwen3", "Qwen3 dense models", qk_norm=True),
            Family(
                "gemma3_text",
                "Gemma 3 (text)",
                "Gemma 3 270M, 1B",
                "gemma3",
                qk_norm=True,
                layer_norms=4,
            ),
            Family("phi3", "Phi-3", "Phi-3 / Phi-3.5 mini, Phi-4-mini", "phi3"),
        )
    }
)
"""The supported families by `model_type` (read-only)."""

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(FAMILIES))
"""The `model_type`s mirror-sd runs, sorted."""

# model_types that are near misses, and why they are refused (UnsupportedModelError's text)
REFUSED: Mapping[str, str] = MappingProxyType(
    {
        "gemma3": "a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration, vision tower "
        "included); only text-only Gemma 3 checkpoints (model_type gemma3_text: the 270M and "
        "1B models) are supported",
        "gemma2": "Gemma 2 (attention and final logit soft-capping with its own norm layout) has "
        "no module tree here yet; Gemma 3 text checkpoints (gemma3_text) are supported",
        "phimoe": "mixture-of-experts Phi models are not supported; dense Phi-3 (phi3) is",
    }
)
