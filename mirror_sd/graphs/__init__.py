"""WHAT runs: models as stages (compact Llama/Qwen forward), KV caches, masks, ModelGraph."""

from mirror_sd.graphs.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from mirror_sd.graphs.kv_cache import StaticKVCache
from mirror_sd.graphs.loader import load_model, load_tokenizer
from mirror_sd.graphs.model import CausalLM
from mirror_sd.graphs.model_graph import ModelGraph, Stage

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "ModelConfig",
    "ModelGraph",
    "Stage",
    "StaticKVCache",
    "UnsupportedModelError",
    "load_model",
    "load_tokenizer",
]
